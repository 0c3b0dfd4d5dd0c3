"""`--ssl_config_file`: TF Serving's `SSLConfig` text proto, turned into gRPC server credentials.

The fields hold the PEM text itself (not file paths), as in TF Serving: `server_key`, `server_cert`, `custom_ca`
(the CA that client certificates must chain to) and `client_verify` (require a client certificate: mTLS).
tensorflow-serving-api does not ship `ssl_config_pb2`, so the message is declared here, field for field from
TF Serving's `config/ssl_config.proto`, which keeps the text format exactly TF Serving's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    text_format,
)

_FIELD = descriptor_pb2.FieldDescriptorProto


def _ssl_config_class() -> type:
    file = descriptor_pb2.FileDescriptorProto(name="tfgate/ssl_config.proto", package="tensorflow.serving",
                                              syntax="proto3")
    message = file.message_type.add(name="SSLConfig")
    for number, (name, kind) in enumerate([("server_key", _FIELD.TYPE_STRING), ("server_cert", _FIELD.TYPE_STRING),
                                           ("custom_ca", _FIELD.TYPE_STRING), ("client_verify", _FIELD.TYPE_BOOL)],
                                          start=1):
        message.field.add(name=name, number=number, type=kind, label=_FIELD.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.SSLConfig"))


class SSLConfigError(ValueError):
    """An SSL config that cannot secure the server; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class SSLConfig:
    server_key: bytes
    server_cert: bytes
    custom_ca: bytes | None
    client_verify: bool

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.server_key, self.server_cert)], root_certificates=self.custom_ca,
                                           require_client_auth=self.client_verify)


def read_ssl_config(path: str | Path) -> SSLConfig:
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise SSLConfigError(f"cannot read SSL config file {str(path)!r}: {error.strerror}") from None
    message = _ssl_config_class()()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as error:
        raise SSLConfigError(f"{path}: {error}") from None
    if not message.server_key or not message.server_cert:
        raise SSLConfigError(f"{path}: server_key and server_cert are both required (PEM text)")
    if message.client_verify and not message.custom_ca:
        raise SSLConfigError(f"{path}: client_verify needs custom_ca, the CA that client certificates chain to")
    return SSLConfig(server_key=message.server_key.encode(), server_cert=message.server_cert.encode(),
                     custom_ca=message.custom_ca.encode() or None, client_verify=message.client_verify)
