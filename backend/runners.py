"""How a validated `ModelCall` gets run: directly on the inference executor, or through the batcher.

Both runners take the client's deadline (time.monotonic() seconds, None for none): a call whose deadline passed
before it started is not run.
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Callable, Mapping, Protocol, TypeVar

import numpy as np

from backend import inference
from backend.deadlines import run_before_deadline
from backend.inference import ModelCall

T = TypeVar("T")


class CallRunner(Protocol):
    async def run(self, call: ModelCall, deadline: float | None) -> dict[str, np.ndarray]: ...


class DirectRunner:
    """One TensorFlow run per request, on the inference executor."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor

    async def run(self, call: ModelCall, deadline: float | None) -> dict[str, np.ndarray]:
        return await run_before_deadline(self._executor, deadline, lambda: inference.run(call))


# Below these sizes, decoding a request or encoding a response costs less than a hop to the executor and back
# (~tens of µs), so it runs on the event loop; above them, on the executor, so a big body never stalls the loop.
INLINE_REQUEST_BYTES = 16 * 1024
INLINE_OUTPUT_ELEMENTS = 4096


async def offload_if(heavy: bool, executor: Executor, deadline: float | None, work: Callable[[], T]) -> T:
    """Run `work` on the executor when it is heavy, else right here."""
    return await run_before_deadline(executor, deadline, work) if heavy else work()


def output_elements(outputs: Mapping[str, np.ndarray]) -> int:
    return sum(value.size for value in outputs.values())
