"""Liveness and readiness, one answer for REST probes and the gRPC health service.

Ready means: every configured model serves every version its policy wants, and the server is not draining. On
SIGTERM the server turns not-ready first, so a load balancer stops sending before connections close.
"""

from __future__ import annotations

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
