"""`python -m gateway --config configs/gateway.yaml` (also `tfgate gateway`): run the gateway until SIGTERM or
Ctrl-C, then drain in-flight requests within --grace-s and exit."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import uvloop

if TYPE_CHECKING:
    from gateway.app import Gateway


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("configs/gateway.yaml"), help="the gateway's YAML")
    parser.add_argument("--grace-s", type=float, default=10.0,
                        help="on SIGTERM, how long in-flight requests may take to finish (default 10)")


async def serve(config: Path, grace_s: float,
                on_ready: Callable[[Gateway], None] | None = None) -> int:
    """Run until SIGTERM or SIGINT, which also stop a start still waiting for the fleet; `on_ready` runs once
    the gateway listens."""
    from gateway.app import Gateway, StartupError

    log = logging.getLogger("tfgate.gateway")
    gateway = Gateway(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    starting = asyncio.create_task(gateway.start(), name="gateway start")
    stopping = asyncio.create_task(stop.wait(), name="stop signal")
    await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.info("stopping before the gateway was ready")
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await gateway.stop(0)
        stopping.cancel()
        return 0  # a stop asked for and done cleanly
    error = starting.exception()
    if error is not None:
        stopping.cancel()
        if isinstance(error, StartupError):
            log.error("cannot start: %s", error)
            return 1
        raise error
    if on_ready is not None:
        on_ready(gateway)
    await stopping
    log.info("stopping: draining in-flight requests (up to %.1f s)", grace_s)
    await gateway.stop(grace_s)
    return 0


def configure_logging() -> None:
    """The server's own log lines go to stderr; stdout carries the JSON access lines (gateway/accesslog.py)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run(args: argparse.Namespace) -> int:
    configure_logging()
    return uvloop.run(serve(args.config, args.grace_s))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
