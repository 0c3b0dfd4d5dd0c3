"""`tensorflow_model_server`'s command line, read into one frozen object.

Flag names, defaults and meanings follow TF Serving's `model_servers/main.cc`, so an existing launch line works
unchanged. Both `--flag=value` and `--flag value` are accepted (TF Serving itself takes only the first); a boolean may
also stand bare (`--enable_model_warmup`) or take `true`/`false`. Unknown flags, TF Serving flags that tfgate does not
implement yet, bad values and contradictory combinations fail at start with a message naming the flag.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable


class FlagError(ValueError):
    """A command line that cannot start a server; the message is meant for the person who typed it."""


@dataclass(frozen=True, slots=True)
class ServerFlags:
    port: int = 8500
    bind_address: str = "0.0.0.0"
    rest_api_port: int = 0
    rest_api_timeout_in_ms: int = 30000
    rest_api_max_body_bytes: int = 64 * 1024 * 1024
    model_name: str = "default"
    model_base_path: str = ""
    model_config_file: str = ""
    model_config_file_poll_wait_seconds: int = 0
    file_system_poll_wait_seconds: int = 1
    enable_model_warmup: bool = True
    max_num_load_retries: int = 5
    load_retry_interval_micros: int = 60_000_000
    saved_model_tags: str = "serve"
    tensorflow_intra_op_parallelism: int = 0
    tensorflow_inter_op_parallelism: int = 0
    allow_version_labels_for_unavailable_models: bool = False
    grace_period_s: float = 30.0
    monitoring_config_file: str = ""
    ssl_config_file: str = ""
    enable_grpc_healthcheck_service: bool = False
    enable_serialization_as_tensor_content: bool = False
    enable_batching: bool = False
    batching_parameters_file: str = ""
    workers: int = 1

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(tag for tag in self.saved_model_tags.split(",") if tag)


_HELP: dict[str, str] = {
    "port": "gRPC port (TF Serving's PredictionService and ModelService)",
    "bind_address": "address the ports listen on (tfgate addition; the fleet binds 127.0.0.1)",
    "rest_api_port": "port of the HTTP/REST API; 0 disables it",
    "rest_api_timeout_in_ms": "timeout of one REST call; past it the client gets 504",
    "rest_api_max_body_bytes": "largest accepted request body (tfgate addition); larger bodies get 413",
    "model_name": "name of the single model served from --model_base_path",
    "model_base_path": "directory holding the numbered versions of the single model",
    "model_config_file": "text ModelServerConfig naming the models to serve",
    "model_config_file_poll_wait_seconds": "how often the config file is re-read; 0 reads it once",
    "file_system_poll_wait_seconds": "how often model base paths are scanned for versions; 0 scans once",
    "enable_model_warmup": "replay assets.extra/tf_serving_warmup_requests before a version is served",
    "max_num_load_retries": "how many times a failed version load is retried",
    "load_retry_interval_micros": "wait between load retries",
    "saved_model_tags": "comma-separated MetaGraph tags to load",
    "tensorflow_intra_op_parallelism": "threads within one op; 0 lets TensorFlow choose",
    "tensorflow_inter_op_parallelism": "threads running a step's independent ops at once; 0 (tfgate's choice) or "
                                       "negative: each step runs its ops in the thread that called it",
    "allow_version_labels_for_unavailable_models": "allow a label to point at a version not yet available",
    "grace_period_s": "on SIGTERM, how long in-flight requests may finish (tfgate addition)",
    "monitoring_config_file": "MonitoringConfig text proto; prometheus_config exposes metrics on the REST port",
    "ssl_config_file": "SSLConfig text proto (PEM texts) securing the gRPC port; client_verify for mTLS",
    "enable_grpc_healthcheck_service": "serve grpc.health.v1 on the gRPC port",
    "enable_serialization_as_tensor_content": "gRPC outputs in tensor_content instead of the typed *_val fields",
    "enable_batching": "merge concurrent requests to a signature into one TensorFlow run",
    "batching_parameters_file": "BatchingParameters text proto; re-read with the model config",
    "workers": "backend processes serving the same ports, each loading every model (tfgate addition): a process "
               "answers requests on one core, so on a multi-core CPU host more workers serve more",
}

# TF Serving flags that a user may pass but this server does not implement yet: named, so the error says so.
_NOT_YET = frozenset({
    "grpc_channel_arguments", "grpc_socket_path",
    "platform_config_file", "rest_api_num_threads", "enable_signature_method_name_check",
    "tensorflow_session_parallelism", "per_process_gpu_memory_fraction",
})

MAX_WORKERS = 256

_FIELDS = {field.name: field for field in dataclasses.fields(ServerFlags)}


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


_PARSERS: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "bool": _parse_bool}


def usage() -> str:
    lines = ["usage: python -m backend [--flag=value | --flag value] ...", "", "flags (TensorFlow Serving's):"]
    for name, field in _FIELDS.items():
        lines.append(f"  --{name}={field.default!r}  ({field.type}) {_HELP[name]}")
    return "\n".join(lines)


def parse_flags(argv: list[str]) -> ServerFlags:
    """Parse a `tensorflow_model_server` command line; raise FlagError with a clear message on any problem."""
    values: dict[str, Any] = {}
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        if not token.startswith("-") or token in ("-", "--"):
            raise FlagError(f"unexpected argument {token!r}: every argument is a --flag")
        name, has_value, text = token.lstrip("-").partition("=")
        if name in _NOT_YET:
            raise FlagError(f"--{name} is a TensorFlow Serving flag that tfgate's backend does not support yet")
        if name not in _FIELDS:
            raise FlagError(f"unknown flag --{name} (run with --help for the list)")
        kind = _FIELDS[name].type
        if not has_value:
            if kind == "bool" and (index >= len(argv) or argv[index].lower() not in ("true", "false")):
                text = "true"
            elif index < len(argv):
                text = argv[index]
                index += 1
            else:
                raise FlagError(f"flag --{name} needs a value")
        if name in values:
            raise FlagError(f"flag --{name} is given twice")
        try:
            values[name] = _PARSERS[str(kind)](text)
        except ValueError as error:
            raise FlagError(f"bad value for --{name}: {error}") from None
    flags = ServerFlags(**values)
    _check(flags)
    return flags


def _check(flags: ServerFlags) -> None:
    if flags.model_config_file and flags.model_base_path:
        raise FlagError("--model_config_file and --model_base_path both given: use one or the other")
    if not flags.model_config_file and not flags.model_base_path:
        raise FlagError("no model to serve: give --model_base_path (with --model_name) or --model_config_file")
    for name in ("port", "rest_api_port"):
        if not 0 <= getattr(flags, name) <= 65535:
            raise FlagError(f"--{name} must be between 0 and 65535")
    if flags.port and flags.port == flags.rest_api_port:
        raise FlagError(f"--port and --rest_api_port are both {flags.port}: they must differ")
    for name in ("rest_api_timeout_in_ms", "rest_api_max_body_bytes"):
        if getattr(flags, name) <= 0:
            raise FlagError(f"--{name} must be positive")
    for name in ("model_config_file_poll_wait_seconds", "file_system_poll_wait_seconds", "max_num_load_retries",
                 "load_retry_interval_micros", "tensorflow_intra_op_parallelism", "grace_period_s"):
        if getattr(flags, name) < 0:
            raise FlagError(f"--{name} must not be negative")
    if not 1 <= flags.workers <= MAX_WORKERS:
        raise FlagError(f"--workers must be between 1 and {MAX_WORKERS}")
    if flags.workers > 1 and not (flags.port or flags.rest_api_port):
        raise FlagError("--workers needs a port to share: --port or --rest_api_port")
    if flags.batching_parameters_file and not flags.enable_batching:
        raise FlagError("--batching_parameters_file is given without --enable_batching")
    if not flags.tags:
        raise FlagError("--saved_model_tags names no tag")
