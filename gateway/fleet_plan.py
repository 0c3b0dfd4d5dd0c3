"""The fleet plan: which backend processes to start, with what environment, flags and ports. Plain code, no I/O.

How it works: with GPUs, one worker per GPU, pinned to exactly that GPU (`CUDA_VISIBLE_DEVICES` is its index, with
`CUDA_DEVICE_ORDER=PCI_BUS_ID` so CUDA counts GPUs as nvidia-smi does); the cores are shared fairly between them
(intra- and inter-op threads = cores // GPUs). Without GPUs, `cpu_replicas` CPU workers (default: one per two cores)
with GPUs hidden explicitly (`CUDA_VISIBLE_DEVICES=-1`), each with cores // replicas intra-op threads and one
inter-op thread, so replicas do not fight over the cores.

Ports: worker i listens for gRPC on `base_port + 2*i` and REST on `base_port + 2*i + 1`, so a fleet of n workers
uses the 2n ports from base_port on, and a worker's ports follow from its index alone.

Guarantees: each worker's flags start with the ones the plan owns (`--port`, `--rest_api_port`, both thread
counts), then `extra_flags` as given; extra flags that would override a planned one raise ValueError naming it,
as do a bad core count, replica count or port range.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from gateway.devices import Gpu

_PLANNED_FLAGS = frozenset(
    {"port", "rest_api_port", "tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism"}
)
_MAX_PORT = 65535


@dataclass(frozen=True, slots=True)
class Worker:
    index: int
    gpu: Gpu | None  # None: a CPU worker
    env: Mapping[str, str]  # added to the supervisor's environment (read-only)
    flags: tuple[str, ...]
    rest_port: int
    grpc_port: int


def plan_workers(
    gpus: Sequence[Gpu], *, cpu_count: int, cpu_replicas: int | None, base_port: int, extra_flags: Sequence[str] = (),
) -> tuple[Worker, ...]:
    """One worker per GPU, or CPU workers when there is none (see the module docstring)."""
    if cpu_count < 1:
        raise ValueError(f"cpu_count must be at least 1, got {cpu_count}")
    if cpu_replicas is not None and cpu_replicas < 1:
        raise ValueError(f"cpu_replicas must be at least 1, got {cpu_replicas}")
    _refuse_planned(extra_flags)
    slots: list[tuple[Gpu | None, dict[str, str], int, int]] = []  # (gpu, env, intra-op, inter-op threads)
    if gpus:
        share = max(1, cpu_count // len(gpus))
        for gpu in gpus:
            env = {"CUDA_VISIBLE_DEVICES": str(gpu.index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
            slots.append((gpu, env, share, share))
    else:
        replicas = cpu_replicas if cpu_replicas is not None else max(1, cpu_count // 2)
        share = max(1, cpu_count // replicas)
        slots.extend((None, {"CUDA_VISIBLE_DEVICES": "-1"}, share, 1) for _ in range(replicas))
    if not 1 <= base_port or base_port + 2 * len(slots) - 1 > _MAX_PORT:
        raise ValueError(f"base_port {base_port} leaves no room for {2 * len(slots)} ports up to {_MAX_PORT}")
    workers = []
    for index, (device, env, intra, inter) in enumerate(slots):
        grpc_port, rest_port = base_port + 2 * index, base_port + 2 * index + 1
        flags = (
            f"--port={grpc_port}",
            f"--rest_api_port={rest_port}",
            f"--tensorflow_intra_op_parallelism={intra}",
            f"--tensorflow_inter_op_parallelism={inter}",
            *extra_flags,
        )
        workers.append(Worker(index, device, MappingProxyType(env), flags, rest_port=rest_port, grpc_port=grpc_port))
    return tuple(workers)


def _refuse_planned(extra_flags: Sequence[str]) -> None:
    """The backend takes `-flag`, `--flag` and `--flag=value`: compare by bare name so no spelling slips past."""
    for token in extra_flags:
        name = token.lstrip("-").partition("=")[0]
        if token.startswith("-") and name in _PLANNED_FLAGS:
            raise ValueError(f"extra flag --{name} is set by the fleet plan for each worker; remove it")
