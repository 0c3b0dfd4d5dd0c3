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


# Decoding a request and encoding a response hold the GIL, so moving them to the executor buys no parallelism: it
# only keeps one huge body from stalling the event loop (the executor's thread hands the GIL back every switch
# interval). The hop itself costs GIL hand-offs and a wait behind running batches, more than half a millisecond of
# decoding: REST predicts of 8 rows × 784 floats (118 KiB, ~0.3 ms to parse), 32 in flight, served 925 / 971
# requests/s offloaded and 1,048 / 1,103 inline; gRPC's 25 KiB requests 519 / 624 and 738 / 776. So the limits
# sit near a millisecond of work: JSON parses at ~2.7 µs per KiB and a TensorProto's packed tensor_content (what
# the official client sends for NumPy arrays) at ~0.15; its typed values, rarer, at ~10; encoding costs ~45 µs
# per 1,000 output values.
INLINE_REQUEST_BYTES = 256 * 1024
INLINE_OUTPUT_ELEMENTS = 16 * 1024


async def offload_if(heavy: bool, executor: Executor, deadline: float | None, work: Callable[[], T]) -> T:
    """Run `work` on the executor when it is heavy, else right here."""
    return await run_before_deadline(executor, deadline, work) if heavy else work()


def output_elements(outputs: Mapping[str, np.ndarray]) -> int:
    return sum(value.size for value in outputs.values())
