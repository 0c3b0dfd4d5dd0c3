"""The `fleet:` section of the gateway's config: the backend processes the gateway starts and supervises itself.

Read by `gateway.config` (the schema below is part of its schema) into one frozen `FleetConfig`. Rules checked here
beyond the schema: the pool exists, the backend flags parse as `python -m backend` would parse them, and none of
them sets what the fleet decides per worker (ports, bind address, threads, model and batching files).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from backend.flags import FlagError, parse_flags
from gateway.config_schema import DURATION, STRING, ConfigError, schema_object
from gateway.fleet_plan import refuse_planned

GpuChoice = Literal["auto", "none"] | tuple[int, ...]
DEFAULT_BASE_PORT = 8700  # clear of TF Serving's 8500/8501 and of the 86xx backends the examples use


@dataclass(frozen=True, slots=True)
class RestartConfig:
    """A crashed backend's restarts: see gateway/restart_policy.py."""

    initial_s: float = 1
    max_s: float = 60  # absent from the file: max(60, initial_s)
    crash_loop_restarts: int = 5  # exits within the window before giving up
    crash_loop_window_s: float = 120
    healthy_after_s: float = 60  # a run this long resets the backoff


@dataclass(frozen=True, slots=True)
class FleetConfig:
    pool: str  # the pool the workers join once ready (its `backends` may be left out)
    model_config_file: Path  # TF Serving's text ModelServerConfig, given to every worker
    gpus: GpuChoice = "auto"  # auto: one worker per GPU found (nvidia-smi -L, CUDA_VISIBLE_DEVICES); none: CPU only
    replicas: int | None = None  # CPU workers when there is no GPU; default: one per two cores
    batching_parameters_file: Path | None = None  # set: workers batch (--enable_batching)
    base_port: int = DEFAULT_BASE_PORT  # workers listen on loopback ports from here (gRPC even, REST odd)
    flags: tuple[str, ...] = ()  # more `python -m backend` flags, e.g. --file_system_poll_wait_seconds=5
    log_dir: Path = Path("logs")  # one file per worker, fleet-<index>.log, rotated
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 3
    ready_timeout_s: float = 300  # model loading included; past it the start counts as a crash
    stop_grace_s: float = 30  # SIGTERM lets in-flight requests finish; SIGKILL after this
    restart: RestartConfig = RestartConfig()


FLEET_SCHEMA = schema_object({
    "pool": STRING,
    "model_config_file": STRING,
    "gpus": {"oneOf": [{"enum": ["auto", "none"]},
                       {"type": "array", "minItems": 1, "uniqueItems": True,
                        "items": {"type": "integer", "minimum": 0}}]},
    "replicas": {"type": "integer", "minimum": 1, "maximum": 64},
    "batching_parameters_file": STRING,
    "base_port": {"type": "integer", "minimum": 1, "maximum": 65532},  # room for a worker and its replacement
    "flags": {"type": "array", "items": STRING},
    "log_dir": STRING,
    "log_max_bytes": {"type": "integer", "minimum": 4096},
    "log_backups": {"type": "integer", "minimum": 0, "maximum": 100},
    "ready_timeout_s": DURATION,
    "stop_grace_s": DURATION,
    "restart": schema_object({
        "initial_s": DURATION, "max_s": DURATION, "crash_loop_restarts": {"type": "integer", "minimum": 0},
        "crash_loop_window_s": DURATION, "healthy_after_s": {"type": "number", "minimum": 0},
    }),
}, required=("pool", "model_config_file"))


def build_fleet(doc: dict[str, Any], base_dir: Path, pools: Mapping[str, object]) -> FleetConfig:
    """The checked `fleet:` section (already valid against FLEET_SCHEMA); paths resolve against `base_dir`."""
    if doc["pool"] not in pools:
        raise ConfigError(f"no pool named {doc['pool']!r} (pools: {', '.join(pools)})", "fleet.pool")
    flags = tuple(doc.get("flags", ()))
    try:
        refuse_planned(flags)
    except ValueError as error:
        raise ConfigError(str(error), "fleet.flags") from None
    try:
        parse_flags(["--model_config_file=checked-by-the-fleet", *flags])
    except FlagError as error:
        raise ConfigError(str(error), "fleet.flags") from None
    restart_doc = doc.get("restart", {})
    restart = RestartConfig(**{"max_s": max(RestartConfig().max_s, restart_doc.get("initial_s", 0)), **restart_doc})
    if restart.initial_s > restart.max_s:
        raise ConfigError(f"must be at least initial_s ({restart.initial_s})", "fleet.restart.max_s")
    gpus = doc.get("gpus", "auto")
    batching = doc.get("batching_parameters_file")
    scalars = {name: doc[name] for name in ("replicas", "base_port", "log_max_bytes", "log_backups",
                                            "ready_timeout_s", "stop_grace_s") if name in doc}
    return FleetConfig(
        pool=doc["pool"], model_config_file=base_dir / doc["model_config_file"],
        gpus=tuple(gpus) if isinstance(gpus, list) else gpus,
        batching_parameters_file=base_dir / batching if batching is not None else None,
        flags=flags, log_dir=base_dir / doc.get("log_dir", "logs"), restart=restart, **scalars)

