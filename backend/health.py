"""Liveness and readiness, one answer for REST probes and the gRPC health service.

Ready means: every configured model serves every version its policy wants, and the server is not draining. On
SIGTERM the server turns not-ready first, so a load balancer stops sending before connections close; gRPC calls
that arrive while draining get UNAVAILABLE (which clients retry elsewhere), and the ones in flight finish.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from backend.models import ModelManager


class Health:
    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager
        self.draining = False

    def ready(self) -> bool:
        return not self.draining and self._manager.is_ready()

    def model_ready(self, name: str, version: int | None) -> bool | None:
        """Whether the model (version) serves; None when the model is not configured at all."""
        if name not in self._manager.model_names():
            return None
        return not self.draining and self._manager.version_ready(name, version)


class InFlight:
    """Counts calls being served, so a drain can wait until none is left (gRPC's own stop would cancel calls
    that its event loop had not yet started; waiting here first lets every accepted call finish)."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __enter__(self) -> None:
        self._count += 1
        self._idle.clear()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._count -= 1
        if not self._count:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
