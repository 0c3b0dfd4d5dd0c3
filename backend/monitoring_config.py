"""TF Serving's `--monitoring_config_file`: whether, and at which REST path, Prometheus metrics are served.

The file is a text `tensorflow.serving.MonitoringConfig`. The serving-api package does not ship that proto's Python
module, so its two messages are declared below, field for field, in a private descriptor pool (never the default
one, where a later serving-api release registering the real module would clash). Parsing is then protobuf's own
text format, with its errors for unknown fields and bad values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    text_format,
)
from google.protobuf.message import Message

DEFAULT_PROMETHEUS_PATH = "/monitoring/prometheus/metrics"  # TF Serving's PrometheusExporter::kPrometheusPath

# tensorflow_serving/config/monitoring_config.proto, as a FileDescriptorProto.
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


def _message_class() -> type[Message]:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(text_format.Parse(_MONITORING_CONFIG_PROTO, descriptor_pb2.FileDescriptorProto()))
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig"))


_MonitoringConfig = _message_class()


class MonitoringConfigError(ValueError):
    """A monitoring config that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class PrometheusSettings:
    enabled: bool = False
    path: str = DEFAULT_PROMETHEUS_PATH


def read_monitoring_config(path: str | os.PathLike[str]) -> PrometheusSettings:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise MonitoringConfigError(f"cannot read monitoring config file {str(path)!r}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise MonitoringConfigError(f"monitoring config file {str(path)!r} is not UTF-8 text") from None
    return parse_monitoring_config(text, source=str(path))


def parse_monitoring_config(text: str, source: str = "<monitoring config>") -> PrometheusSettings:
    message = _MonitoringConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as error:
        raise MonitoringConfigError(f"{source}: {error}") from None
    prometheus = message.prometheus_config
    if not prometheus.enable:
        # TF Serving ignores the path of a disabled exporter; so do we, so that its configs keep starting.
        return PrometheusSettings()
    path = prometheus.path or DEFAULT_PROMETHEUS_PATH
    if not path.startswith("/"):
        raise MonitoringConfigError(f"{source}: prometheus_config path {path!r} must start with '/'")
    return PrometheusSettings(enabled=True, path=path)
