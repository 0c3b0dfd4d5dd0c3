"""TF Serving config messages that tensorflow-serving-api does not ship, declared here so their text files parse
exactly as TF Serving parses them.

How it works: each message is written below as a text `FileDescriptorProto`, field for field (names, numbers,
types) from TF Serving's .proto file of the same name, and added to one private descriptor pool, together with
protobuf's own `wrappers.proto` for the `Int64Value`-style fields. Protobuf then builds the message classes, and its
text format parses them, with its own errors for unknown fields and bad values.

Why a private pool: the default pool is process-wide; if a later serving-api release registers the real modules
there, declaring the same names in it would clash. Only the messages tfgate reads are declared; a file that holds
more messages in TF Serving (session_bundle_config.proto) holds only the one needed here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    text_format,
    wrappers_pb2,
)
from google.protobuf.message import Message

_M = TypeVar("_M", bound=Message)

# tensorflow_serving/config/ssl_config.proto
_SSL_CONFIG_PROTO = """
name: "tensorflow_serving/config/ssl_config.proto" package: "tensorflow.serving" syntax: "proto3"
message_type {
  name: "SSLConfig"
  field { name: "server_key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "server_cert" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "custom_ca" number: 3 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "client_verify" number: 4 label: LABEL_OPTIONAL type: TYPE_BOOL }
}
"""

# tensorflow_serving/config/monitoring_config.proto
_MONITORING_CONFIG_PROTO = """
name: "tensorflow_serving/config/monitoring_config.proto" package: "tensorflow.serving" syntax: "proto3"
message_type {
  name: "PrometheusConfig"
  field { name: "enable" number: 1 label: LABEL_OPTIONAL type: TYPE_BOOL }
  field { name: "path" number: 2 label: LABEL_OPTIONAL type: TYPE_STRING }
}
message_type {
  name: "MonitoringConfig"
  field { name: "prometheus_config" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".tensorflow.serving.PrometheusConfig" }
}
"""

# tensorflow_serving/servables/tensorflow/session_bundle_config.proto: BatchingParameters only (SessionBundleConfig
# would drag in TensorFlow's ConfigProto). The wrapper types are how TF Serving tells "absent" from zero.
_SESSION_BUNDLE_CONFIG_PROTO = """
name: "tensorflow_serving/servables/tensorflow/session_bundle_config.proto" package: "tensorflow.serving"
syntax: "proto3" dependency: "google/protobuf/wrappers.proto"
message_type {
  name: "BatchingParameters"
  field { name: "max_batch_size" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".google.protobuf.Int64Value" }
  field { name: "batch_timeout_micros" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".google.protobuf.Int64Value" }
  field { name: "max_enqueued_batches" number: 3 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".google.protobuf.Int64Value" }
  field { name: "num_batch_threads" number: 4 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".google.protobuf.Int64Value" }
  field { name: "thread_pool_name" number: 5 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".google.protobuf.StringValue" }
  field { name: "enable_large_batch_splitting" number: 8 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".google.protobuf.BoolValue" }
  field { name: "max_execution_batch_size" number: 9 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".google.protobuf.Int64Value" }
  field { name: "allowed_batch_sizes" number: 6 label: LABEL_REPEATED type: TYPE_INT64 }
  field { name: "pad_variable_length_inputs" number: 7 label: LABEL_OPTIONAL type: TYPE_BOOL }
}
"""


def _declare() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    for file in (_SSL_CONFIG_PROTO, _MONITORING_CONFIG_PROTO, _SESSION_BUNDLE_CONFIG_PROTO):
        pool.Add(text_format.Parse(file, descriptor_pb2.FileDescriptorProto()))
    return pool


_POOL = _declare()


def _message_class(full_name: str) -> type[Message]:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(full_name))


SSLConfig = _message_class("tensorflow.serving.SSLConfig")
MonitoringConfig = _message_class("tensorflow.serving.MonitoringConfig")
BatchingParameters = _message_class("tensorflow.serving.BatchingParameters")


class ProtoTextError(ValueError):
    """A text proto file that cannot be read or parsed; the message names the file (and the line:column)."""


def read_text(path: str | os.PathLike[str], what: str,
              error: type[ProtoTextError] = ProtoTextError) -> str:
    """The file's UTF-8 text (as TF Serving reads it), or `error` saying "cannot read <what> file '<path>': ..."."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as cause:
        raise error(f"cannot read {what} file {str(path)!r}: {cause.strerror}") from None
    except UnicodeDecodeError:
        raise error(f"{what} file {str(path)!r} is not UTF-8 text") from None


def parse_text(message_class: type[_M], text: str, source: str,
               error: type[ProtoTextError] = ProtoTextError) -> _M:
    """`text` parsed into a new `message_class`, or `error` naming `source` and the line:column at fault.

    `error` lets each config module raise its own subclass, so its callers catch one class per file kind.
    """
    message = message_class()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as cause:
        raise error(f"{source}: {cause}") from None
    return message
