"""The set of models to serve, read from `--model_config_file` (text `ModelServerConfig`) or from the single-model
flags, into frozen objects. The only reader of the config file; parsed with the serving-api package's own proto.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from backend.flags import ServerFlags
from backend.version_policy import VersionPolicy


class ModelConfigError(ValueError):
    """A model config that cannot be served; the message names the model or the line at fault."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    base_path: Path
    policy: VersionPolicy = VersionPolicy()
    labels: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


def single_model(flags: ServerFlags) -> tuple[ModelConfig, ...]:
    """The one model named by --model_name/--model_base_path, served with the default policy (latest 1)."""
    return (ModelConfig(name=flags.model_name, base_path=_absolute(flags.model_base_path, "--model_base_path")),)


def read_model_config_file(path: str | os.PathLike[str]) -> tuple[ModelConfig, ...]:
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ModelConfigError(f"cannot read model config file {str(path)!r}: {error.strerror}") from None
    return parse_model_config(text, source=str(path))


def parse_model_config(text: str, source: str = "<model config>") -> tuple[ModelConfig, ...]:
    message = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as error:
        raise ModelConfigError(f"{source}: {error}") from None
    return configs_from_proto(message, source)


def configs_from_proto(message: model_server_config_pb2.ModelServerConfig,
                       source: str = "<model config>") -> tuple[ModelConfig, ...]:
    """The models of a ModelServerConfig, from a file or from gRPC's HandleReloadConfigRequest."""
    if message.WhichOneof("config") == "custom_model_config":
        raise ModelConfigError(f"{source}: custom_model_config is not supported; use model_config_list")
    models: list[ModelConfig] = []
    for entry in message.model_config_list.config:
        models.append(_model(entry, source))
    # Counted once, not per name: a 20,000-model ReloadConfigRequest took 6.5 s of the event loop to be checked.
    duplicates = sorted(name for name, count in Counter(model.name for model in models).items() if count > 1)
    if duplicates:
        raise ModelConfigError(f"{source}: model {duplicates[0]!r} is configured twice")
    return tuple(models)


def _model(entry: model_server_config_pb2.ModelConfig, source: str) -> ModelConfig:
    if not entry.name:
        raise ModelConfigError(f"{source}: a model config has no name")
    where = f"{source}: model {entry.name!r}"
    if not entry.base_path:
        raise ModelConfigError(f"{where} has no base_path")
    if entry.model_platform not in ("", "tensorflow"):
        raise ModelConfigError(f"{where}: model_platform {entry.model_platform!r} is not supported (tensorflow only)")
    labels = dict(entry.version_labels)
    for label in labels:
        if not label or label.isdigit():
            raise ModelConfigError(f"{where}: version label {label!r} must be a non-numeric name")
    return ModelConfig(
        name=entry.name,
        base_path=_absolute(entry.base_path, where),
        policy=_policy(entry, where),
        labels=MappingProxyType(labels),
    )


def _policy(entry: model_server_config_pb2.ModelConfig, where: str) -> VersionPolicy:
    policy = entry.model_version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return VersionPolicy(kind="all")
    if kind == "specific":
        if not policy.specific.versions:
            raise ModelConfigError(f"{where}: specific version policy lists no version")
        return VersionPolicy(kind="specific", versions=frozenset(policy.specific.versions))
    # An unset (0) num_versions means 1, as in TF Serving's proto.
    return VersionPolicy(kind="latest", num_versions=policy.latest.num_versions or 1)


def _absolute(base_path: str, where: str) -> Path:
    """TF Serving reads a relative base path against the working directory; so do we, once, at parse time.

    A path no file system can hold is refused here: HandleReloadConfigRequest gets any string, and a NUL byte made
    the model manager's scan raise ValueError mid-reload (INTERNAL), as "~nobody/x" made expanduser raise."""
    if "\x00" in base_path:
        raise ModelConfigError(f"{where}: base_path {base_path!r} holds a NUL byte")
    try:
        return Path(base_path).expanduser().absolute()
    except RuntimeError as error:  # "~user/..." naming no user
        raise ModelConfigError(f"{where}: base_path {base_path!r}: {error}") from None
