"""TF Serving's batching parameters: `--batching_parameters_file`, or a model's own `batching_params.pbtxt`.

The file is a text `tensorflow.serving.BatchingParameters` (TF Serving's message, see `declared_protos`). Every field
is optional; an absent one takes the default of the TF Serving struct that consumes it, so a file that sets only
`max_batch_size` behaves as it does in TF Serving:
- `max_batch_size` 1000, `batch_timeout_micros` 0, `max_enqueued_batches` 10: `SharedBatchScheduler::QueueOptions`;
- `num_batch_threads`: `SharedBatchScheduler::Options`, `port::MaxParallelism()`, the CPUs this process may use;
- `allowed_batch_sizes` empty (any size), `pad_variable_length_inputs` false: `BatchingSessionOptions`.
The checks are those TF Serving makes when it builds the scheduler and the batching session, made here at start so a
bad file fails in the first second with its name and field. Fields tfgate does not act on (large-batch splitting,
the thread pool's name) still parse, and are listed in `ignored_fields` for the server to log once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from backend import declared_protos

PER_MODEL_FILE = "batching_params.pbtxt"  # TF Serving's kBatchingParamsFilename, read from the version directory

_WRAPPED = ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads")
_IGNORED = ("thread_pool_name", "enable_large_batch_splitting", "max_execution_batch_size")
_POSITIVE = ("max_batch_size", "max_enqueued_batches", "num_batch_threads")


def schedulable_cpus() -> int:
    """As TF's `port::MaxParallelism()`: the CPUs this process may run on, so a cpuset or taskset counts."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class BatchingConfigError(declared_protos.ProtoTextError):
    """Batching parameters TF Serving would refuse; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class BatchingParameters:
    """One queue's batching; the defaults are TF Serving's (see the module docstring)."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = field(default_factory=schedulable_cpus)
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False
    ignored_fields: tuple[str, ...] = ()

    @property
    def batch_timeout_s(self) -> float:
        return self.batch_timeout_micros / 1_000_000

    def intra_op_threads(self, cpus: int) -> int:
        """Threads one op may use when the operator left it to us: the CPUs split among the batches that run at
        once. TensorFlow's own choice, every CPU for every op, puts two batches and the event loop on the same cores,
        and an op split across threads waits for its slowest one (a thread the event loop has preempted)."""
        return max(1, cpus // self.num_batch_threads)


def read_batching_parameters(path: str | os.PathLike[str]) -> BatchingParameters:
    text = declared_protos.read_text(path, "batching parameters", BatchingConfigError)
    return parse_batching_parameters(text, source=str(path))


def read_model_batching_parameters(version_dir: Path) -> BatchingParameters | None:
    """The version's own `batching_params.pbtxt` (TF Serving's `--enable_per_model_batching_parameters`), if any."""
    path = version_dir / PER_MODEL_FILE
    return read_batching_parameters(path) if path.exists() else None


def parse_batching_parameters(text: str, source: str = "<batching parameters>") -> BatchingParameters:
    message = declared_protos.parse_text(declared_protos.BatchingParameters, text, source, BatchingConfigError)
    given: dict[str, int] = {name: getattr(message, name).value for name in _WRAPPED if message.HasField(name)}
    parameters = BatchingParameters(**given, allowed_batch_sizes=tuple(message.allowed_batch_sizes),
                                    pad_variable_length_inputs=message.pad_variable_length_inputs,
                                    ignored_fields=tuple(name for name in _IGNORED if message.HasField(name)))
    _check(parameters, source)
    return parameters


def _check(parameters: BatchingParameters, source: str) -> None:
    for name in _POSITIVE:
        if (value := getattr(parameters, name)) <= 0:
            raise BatchingConfigError(f"{source}: {name} must be positive, not {value}")
    if parameters.batch_timeout_micros < 0:
        raise BatchingConfigError(f"{source}: batch_timeout_micros must not be negative, not "
                                  f"{parameters.batch_timeout_micros}")
    sizes = parameters.allowed_batch_sizes
    if not sizes:
        return
    if any(later <= earlier for earlier, later in pairwise((0, *sizes))):
        raise BatchingConfigError(f"{source}: allowed_batch_sizes must be positive and strictly increasing, not "
                                  f"{list(sizes)}")
    if sizes[-1] != parameters.max_batch_size:
        # TF Serving's rule: the largest allowed size is the batch size limit, default or not.
        raise BatchingConfigError(f"{source}: the last allowed_batch_sizes entry must equal max_batch_size "
                                  f"({parameters.max_batch_size}), not {sizes[-1]}")
