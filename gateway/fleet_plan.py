"""The fleet plan: which backend processes to start, with what environment, flags and ports. Plain code, no I/O.

How it works: with GPUs, one worker per GPU, pinned to exactly that GPU (`CUDA_VISIBLE_DEVICES` is its index, with
`CUDA_DEVICE_ORDER=PCI_BUS_ID` so CUDA counts GPUs as nvidia-smi does); the cores are shared fairly between them
(intra- and inter-op threads = cores // GPUs). Without GPUs, `cpu_replicas` CPU workers (default: one per two cores)
with GPUs hidden explicitly (`CUDA_VISIBLE_DEVICES=-1`), each with cores // replicas intra-op threads and no
inter-op pool (`--tensorflow_inter_op_parallelism=0`: a step runs its ops in the thread that called it), so replicas
do not fight over the cores.

Ports: a process listens on one numbered pair of loopback ports, gRPC on `base_port + 2*k` and REST on
`base_port + 2*k + 1`. Worker i runs on pair i; while a rolling change replaces it, the replacement starts on the
lowest pair no process of the fleet holds and no other worker owns (`choose_pair`), so the old one serves until the
new one is ready; a pair another program holds a port of is passed over the same way. A fleet of n workers so uses
the ports from base_port up to base_port + 2n + 1, none of which may be one the rest of the config already uses on
this host (`reserved_ports`): a clash would only show later, as a worker's crash loop.

Guarantees: each worker's flags start with the thread counts the plan owns, then `extra_flags` as given; extra flags
that would set anything the fleet decides (`PLANNED_FLAGS`) raise ValueError naming it, as do a bad core count,
replica count or port range.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from gateway.devices import Gpu

# Set by the fleet for each process: its ports and loopback address, its share of the cores, and the files every
# worker of the fleet shares.
PLANNED_FLAGS = frozenset({
    "port", "rest_api_port", "bind_address", "tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism",
    "model_config_file", "model_name", "model_base_path", "enable_batching", "batching_parameters_file",
})
_MAX_PORT = 65535


@dataclass(frozen=True, slots=True)
class Worker:
    index: int
    gpu: Gpu | None  # None: a CPU worker
    env: Mapping[str, str]  # added to the supervisor's environment (read-only)
    flags: tuple[str, ...]  # without ports: those depend on the pair a process gets (`port_flags`)


def plan_workers(
    gpus: Sequence[Gpu], *, cpu_count: int, cpu_replicas: int | None, base_port: int, extra_flags: Sequence[str] = (),
    reserved_ports: Collection[int] = (),
) -> tuple[Worker, ...]:
    """One worker per GPU, or CPU workers when there is none (see the module docstring)."""
    if cpu_count < 1:
        raise ValueError(f"cpu_count must be at least 1, got {cpu_count}")
    if cpu_replicas is not None and cpu_replicas < 1:
        raise ValueError(f"cpu_replicas must be at least 1, got {cpu_replicas}")
    refuse_planned(extra_flags)
    slots: list[tuple[Gpu | None, dict[str, str], int, int]] = []  # (gpu, env, intra-op, inter-op threads)
    if gpus:
        share = max(1, cpu_count // len(gpus))
        for gpu in gpus:
            env = {"CUDA_VISIBLE_DEVICES": str(gpu.index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
            slots.append((gpu, env, share, share))
    else:
        replicas = cpu_replicas if cpu_replicas is not None else max(1, cpu_count // 2)
        share = max(1, cpu_count // replicas)
        slots.extend((None, {"CUDA_VISIBLE_DEVICES": "-1"}, share, 0) for _ in range(replicas))
    last_port = base_port + 2 * (len(slots) + 1) - 1  # n pairs, and one for a replacement
    if not 1 <= base_port or last_port > _MAX_PORT:
        raise ValueError(f"base_port {base_port} leaves no room for {2 * (len(slots) + 1)} ports up to {_MAX_PORT}")
    clashes = sorted(port for port in reserved_ports if base_port <= port <= last_port)
    if clashes:
        raise ValueError(f"the fleet's {len(slots)} worker(s) need ports {base_port}-{last_port}, but the config "
                         f"already uses {', '.join(map(str, clashes))} on this host (listen or pool addresses): "
                         "choose another fleet.base_port")
    return tuple(
        Worker(index, device, MappingProxyType(env),
               (f"--tensorflow_intra_op_parallelism={intra}", f"--tensorflow_inter_op_parallelism={inter}",
                *extra_flags))
        for index, (device, env, intra, inter) in enumerate(slots)
    )


def port_pair(base_port: int, pair: int) -> tuple[int, int]:
    """(gRPC port, REST port) of pair number `pair`."""
    return base_port + 2 * pair, base_port + 2 * pair + 1


def port_flags(base_port: int, pair: int) -> tuple[str, str]:
    grpc_port, rest_port = port_pair(base_port, pair)
    return f"--port={grpc_port}", f"--rest_api_port={rest_port}"


def free_pair(preferred: int, taken: Collection[int]) -> int:
    """`preferred` when no process holds it, else the lowest pair number nobody holds."""
    if preferred not in taken:
        return preferred
    pair = 0
    while pair in taken:
        pair += 1
    return pair


_PAIRS_PROBED = 8  # pairs tried when ports are in use; past them the worker starts anyway, and its exit is reported


@dataclass(frozen=True, slots=True)
class PairChoice:
    pair: int
    skipped: tuple[tuple[int, ...], ...]  # the busy ports of each pair passed over, in order, for the log


def choose_pair(base_port: int, index: int, workers: int, used_ports: Collection[int],
                bindable: Callable[[int], bool], probes: int = _PAIRS_PROBED) -> PairChoice:
    """The pair worker `index` of `workers` starts on: its own unless a process of the fleet holds a port of it
    (`used_ports`: starting, serving and stopping processes alike), else the lowest pair no process holds and no
    other worker owns (taking a sibling's own pair would displace the sibling in turn). A pair with a port that is
    not `bindable` (held by another program, or a connection's local end: base_port may lie in the system's
    ephemeral range) is passed over, up to `probes` pairs; past them the last one is taken anyway, and the worker's
    exit at its bind is reported as any other. `bindable` is asked about each port at most once, pair by pair, and
    may take the port it answers True for (the fleet's does, so that it stays free: gateway/fleet_ports.py)."""
    taken = {k for k in range(2 * workers + 2) if set(used_ports).intersection(port_pair(base_port, k))}
    taken.update(other for other in range(workers) if other != index)
    pair = free_pair(index, taken)
    skipped: list[tuple[int, ...]] = []
    for _ in range(probes):
        busy = tuple(port for port in port_pair(base_port, pair) if not bindable(port))
        if not busy:
            break
        skipped.append(busy)
        taken.add(pair)
        pair = free_pair(index, taken)
    return PairChoice(pair, tuple(skipped))


def refuse_planned(extra_flags: Sequence[str]) -> None:
    """The backend takes `-flag`, `--flag` and `--flag=value`: compare by bare name so no spelling slips past."""
    for token in extra_flags:
        name = token.lstrip("-").partition("=")[0]
        if token.startswith("-") and name in PLANNED_FLAGS:
            raise ValueError(f"--{name} is set by the fleet for each worker; remove it")
