"""`--ssl_config_file`: TF Serving's `SSLConfig` text proto, turned into gRPC server credentials.

The fields hold the PEM text itself (not file paths), as in TF Serving: `server_key`, `server_cert`, `custom_ca`
(the CA that client certificates must chain to) and `client_verify` (require a client certificate: mTLS).
The message is TF Serving's own (see `declared_protos`), so the text format is exactly TF Serving's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from backend import declared_protos


class SSLConfigError(declared_protos.ProtoTextError):
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
    text = declared_protos.read_text(path, "SSL config", SSLConfigError)
    message = declared_protos.parse_text(declared_protos.SSLConfig, text, str(path), SSLConfigError)
    if not message.server_key or not message.server_cert:
        raise SSLConfigError(f"{path}: server_key and server_cert are both required (PEM text)")
    if message.client_verify and not message.custom_ca:
        raise SSLConfigError(f"{path}: client_verify needs custom_ca, the CA that client certificates chain to")
    return SSLConfig(server_key=message.server_key.encode(), server_cert=message.server_cert.encode(),
                     custom_ca=message.custom_ca.encode() or None, client_verify=message.client_verify)
