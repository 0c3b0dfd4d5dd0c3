"""Which GPUs this host offers the fleet: `nvidia-smi -L` read, then narrowed by `CUDA_VISIBLE_DEVICES`.

How it works: `detect_gpus` is plain code; the one command it needs comes in as `run` (`run_command` in production,
a fake in tests) and the environment as a mapping, so every case is a table row.
- No `CUDA_VISIBLE_DEVICES`: every GPU nvidia-smi lists.
- `""` or `"-1"`: no GPU at all (the operator asked for CPU workers).
- Otherwise a comma list of indexes and/or UUIDs: those GPUs, in the order listed, each once. An entry nvidia-smi
  does not list (a MIG UUID, an index out of range, a typo) is dropped. Without nvidia-smi, listed indexes are
  trusted as `Gpu(index, "unknown", "")`; listed UUIDs cannot be resolved to an index and are dropped.
Indexes are nvidia-smi's, i.e. PCI bus order; the fleet plan pins workers to that order (`CUDA_DEVICE_ORDER`).

Guarantees: never raises on odd nvidia-smi output (unknown lines, MIG lines and garbage are skipped); the result
holds each GPU index at most once.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

# "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-1f2e...)"; MIG lines start with whitespace and "MIG", so never match.
_GPU_LINE = re.compile(r"GPU (\d+): (.*?)(?: \(UUID: ([^)]*)\))?")
_COMMAND_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int  # nvidia-smi's index (PCI bus order)
    name: str
    uuid: str  # "GPU-…", or "" when unknown


def parse_nvidia_smi_list(text: str) -> tuple[Gpu, ...]:
    """The GPUs in `nvidia-smi -L` output; anything that is not a GPU line is skipped, not an error."""
    gpus: list[Gpu] = []
    for line in text.splitlines():
        match = _GPU_LINE.fullmatch(line.rstrip())
        if match is not None:
            gpus.append(Gpu(index=int(match[1]), name=match[2].strip(), uuid=match[3] or ""))
    return tuple(gpus)


def detect_gpus(run: Callable[[Sequence[str]], str | None], environ: Mapping[str, str]) -> tuple[Gpu, ...]:
    """The GPUs the fleet may use: nvidia-smi's list narrowed by CUDA_VISIBLE_DEVICES (see the module docstring)."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return ()  # asked for no GPU: nvidia-smi need not even run
    output = run(["nvidia-smi", "-L"])
    known = parse_nvidia_smi_list(output) if output is not None else ()
    if visible is None:
        return known
    by_key = {str(gpu.index): gpu for gpu in known} | {gpu.uuid: gpu for gpu in known if gpu.uuid}
    chosen: dict[int, Gpu] = {}
    for entry in (part.strip() for part in visible.split(",")):
        gpu = by_key.get(entry)
        if gpu is None and output is None and entry.isdigit():
            gpu = Gpu(index=int(entry), name="unknown", uuid="")
        if gpu is not None:
            chosen.setdefault(gpu.index, gpu)
    return tuple(chosen.values())


def run_command(argv: Sequence[str]) -> str | None:
    """The I/O edge for `detect_gpus`: stdout, or None when the command is missing, fails or hangs."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None
