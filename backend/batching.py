"""Dynamic batching decisions: which queued requests form the next batch, and when. Plain code, no I/O.

How it works: requests (tasks) for one model version, signature and input shape wait in a `BatchQueue`. A batch is
due when the queue holds `max_batch_size` rows, or when its oldest task has waited `batch_timeout`; the scheduler
also waits for a free batch thread, so under load batches grow instead of queueing runs. `take()` drops tasks
whose deadline passed while they waited, or whose callers are gone (no TensorFlow time is spent on them), then takes
tasks first-in first-out up to `max_batch_size` rows, and rounds the batch up to the next `allowed_batch_sizes`
entry (the extra rows are padding the runner adds and removes). A queue holding `max_enqueued_batches` batches
worth of rows refuses more at once, so overload is an immediate 429 instead of unbounded latency.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

Payload = TypeVar("Payload")


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_batch_size: int
    timeout_s: float
    max_enqueued_batches: int
    allowed_batch_sizes: tuple[int, ...] = ()

    def padded_size(self, rows: int) -> int:
        """The smallest allowed batch size holding `rows` (rows itself when any size is allowed)."""
        index = bisect.bisect_left(self.allowed_batch_sizes, rows)
        return self.allowed_batch_sizes[index] if index < len(self.allowed_batch_sizes) else rows


# Task, Batch and BatchQueue are plain classes, not dataclasses: the module is compiled (mypyc), which cannot compile a
# generic dataclass (it fails at import).
class Task(Generic[Payload]):
    __slots__ = ("abandoned", "deadline", "enqueued_at", "payload", "rows")

    def __init__(self, rows: int, enqueued_at: float, deadline: float | None, payload: Payload,
                 abandoned: Callable[[], bool] = lambda: False) -> None:
        self.rows = rows
        self.enqueued_at = enqueued_at
        self.deadline = deadline
        self.payload = payload
        self.abandoned = abandoned  # true once nobody waits for the answer (a client gone)

    def expired(self, now: float) -> bool:
        return (self.deadline is not None and self.deadline <= now) or self.abandoned()


class Batch(Generic[Payload]):
    __slots__ = ("expired", "padded_rows", "tasks")

    def __init__(self, tasks: list[Task[Payload]], expired: list[Task[Payload]], padded_rows: int) -> None:
        self.tasks = tasks
        self.expired = expired
        self.padded_rows = padded_rows

    @property
    def rows(self) -> int:
        return sum(task.rows for task in self.tasks)


class BatchQueue(Generic[Payload]):
    __slots__ = ("_rows", "_tasks", "policy")

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self._tasks: deque[Task[Payload]] = deque()
        self._rows = 0

    @property
    def rows(self) -> int:
        return self._rows

    def __len__(self) -> int:
        return len(self._tasks)

    def fits(self, rows: int) -> bool:
        """Whether a task of this many rows can be batched at all (a larger one runs alone)."""
        return 0 < rows <= self.policy.max_batch_size

    def admit(self, task: Task[Payload]) -> bool:
        """Queue the task, or refuse it (False) when the queue already holds its limit of rows."""
        if self._rows + task.rows > self.policy.max_enqueued_batches * self.policy.max_batch_size:
            return False
        self._tasks.append(task)
        self._rows += task.rows
        return True

    def due_at(self) -> float | None:
        """When the oldest task's batch is due by timeout; None when empty."""
        return self._tasks[0].enqueued_at + self.policy.timeout_s if self._tasks else None

    def full(self) -> bool:
        """Whether the queue holds a whole batch: it is due now, whatever the timeout."""
        return self._rows >= self.policy.max_batch_size

    def ready(self, now: float) -> bool:
        due = self.due_at()
        return due is not None and (self.full() or now >= due)

    def take(self, now: float) -> Batch[Payload]:
        expired = [task for task in self._tasks if task.expired(now)]
        if expired:
            self._tasks = deque(task for task in self._tasks if task not in expired)
            self._rows -= sum(task.rows for task in expired)
        taken: list[Task[Payload]] = []
        rows = 0
        # At least one task, even one the policy has since shrunk below: it runs alone rather than wait forever.
        while self._tasks and (not taken or rows + self._tasks[0].rows <= self.policy.max_batch_size):
            task = self._tasks.popleft()
            taken.append(task)
            rows += task.rows
        self._rows -= rows
        return Batch(tasks=taken, expired=expired, padded_rows=self.policy.padded_size(rows) if taken else 0)
