"""Reading a config for a (re)load, and the steps of a reload, shared by the one-process gateway (gateway/app.py) and
the primary of several (gateway/primary.py).

A reload reads and checks the file off the event loop (config, certificates, JWKS), refuses changes that only a
restart can apply, applies the `fleet:` section, then lets the caller install the result. Any refusal leaves the
running config untouched and answers one message naming the cause; the metrics count both outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from gateway.auth import AuthConfigError, Authenticator
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.fleet import FleetSection
from gateway.metrics import GatewayMetrics
from gateway.tls import TlsError, server_context

log = logging.getLogger("tfgate.gateway")

ReadConfig = tuple[GatewayConfig, ssl.SSLContext, Authenticator]
READ_ERRORS = (ConfigError, TlsError, AuthConfigError)


def read_config(path: Path) -> ReadConfig:
    """Everything a snapshot needs from files: call it off the event loop (it reads the config, certificates and
    JWKS)."""
    config = load_config(path)
    return config, server_context(config.tls), Authenticator.from_config(config.auth)


def check_reloadable(current: GatewayConfig, new: GatewayConfig) -> None:
    """Refuse what a running gateway cannot change."""
    if new.listen != current.listen:
        raise ConfigError(f"listen: changed from {_listen(current)} to {_listen(new)}; a new listen address needs a "
                          "restart")
    if new.tls.client_cert != current.tls.client_cert:
        # The listener's TLS context keeps the verify mode it started with (OpenSSL does not take it from the
        # context a connection switches to), so this change would not apply: refuse it.
        raise ConfigError("tls.client_cert: asking clients for certificates (or not) needs a restart")
    if new.workers != current.workers:
        raise ConfigError(f"workers: changed from {current.workers} to {new.workers}; that needs a restart")


async def reload_config(path: Path, current: GatewayConfig, generation: int, reason: str, metrics: GatewayMetrics,
                        fleet: FleetSection, install: Callable[[ReadConfig], Awaitable[str]],
                        shown_as: Path | None = None) -> tuple[bool, str]:
    """Read, check, apply the fleet section, install; (applied, message). Callers hold their reload lock.
    `shown_as`: the file to name in the log, when `path` is a copy of it."""
    try:
        read = await asyncio.to_thread(read_config, path)
        check_reloadable(current, read[0])
        await fleet.apply(read[0])
    except (*READ_ERRORS, ValueError) as error:
        metrics.reloaded(False)
        log.error("config reload (%s) rejected, still serving generation %d: %s", reason, generation, error)
        return False, f"config rejected, still serving generation {generation}: {error}"
    message = await install(read)
    metrics.reloaded(True)
    log.info("config reload (%s): %s, from %s", reason, message, shown_as or path)
    return True, message


def _listen(config: GatewayConfig) -> str:
    return f"https {config.listen.https}, admin {config.listen.admin}"


class Lifecycle:
    """Where a gateway (or the primary of its workers) is, starting, serving or stopping, and what SIGHUP does in
    each: it starts a reload, as a task kept in `tasks` until done (so a stop can cancel it).

    The handler is installed before the gateway starts anything: SIGHUP's default action ends the process, so a
    signal sent while it starts (a config tool reloading a service just started) or drains would otherwise kill it
    and every request it holds. One that comes during the start reloads once the gateway serves; one during the stop is ignored."""

    def __init__(self, tasks: list[asyncio.Task[Any]], reload: Callable[[str], Coroutine[Any, Any, object]]) -> None:
        self.serving = asyncio.Event()  # set once the gateway listens
        self.stopping = False
        self._tasks = tasks
        self._reload = reload

    @property
    def ready(self) -> bool:
        return self.serving.is_set() and not self.stopping

    async def starting(self, start: Awaitable[None]) -> None:
        """Await the gateway's `start` with the handler installed; a start that fails leaves SIGHUP as it was."""
        with contextlib.suppress(RuntimeError, ValueError):  # only the main thread's loop takes signals
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
        try:
            await start
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    def _on_sighup(self) -> None:
        if self.stopping:
            log.info("SIGHUP ignored: the gateway is stopping")
            return
        task = asyncio.create_task(self._reload_once_serving(), name="SIGHUP reload")
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _reload_once_serving(self) -> None:
        await self.serving.wait()
        await self._reload("SIGHUP")
