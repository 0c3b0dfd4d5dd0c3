"""`python -m gateway --config configs/gateway.yaml` (also `tfgate gateway`): run the gateway until SIGTERM or
Ctrl-C, then drain in-flight requests within --grace-s and exit."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import uvloop

if TYPE_CHECKING:
    from gateway.config import GatewayConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("configs/gateway.yaml"), help="the gateway's YAML")
    parser.add_argument("--grace-s", type=float, default=10.0,
                        help="on SIGTERM, how long in-flight requests may take to finish (default 10)")
    # A worker of gateway/primary.py: it writes its admin port to this file once it serves, ...
    parser.add_argument("--worker-ready-file", type=Path, help=argparse.SUPPRESS)
    # ... keeps its rate limits' buckets in this file, shared with the other workers, ...
    parser.add_argument("--shared-rate-limits", type=Path, help=argparse.SUPPRESS)
    # ... and names itself by this index in its log lines.
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)


class Running(Protocol):
    """What `on_ready` may read: the one-process gateway or the primary of several."""

    @property
    def https_port(self) -> int: ...

    @property
    def admin_port(self) -> int: ...

    @property
    def grpc_port(self) -> int: ...  # 0 without listen.grpc

    @property
    def config(self) -> GatewayConfig: ...


async def serve(config: Path, grace_s: float, on_ready: Callable[[Running], None] | None = None, *,
                ready_file: Path | None = None, shared_rate_limits: Path | None = None) -> int:
    """Run until SIGTERM or SIGINT, which also stop a start still waiting for the fleet; `on_ready` runs once
    the gateway listens. One process, or a primary with `workers:` processes (gateway/primary.py)."""
    from gateway import app, primary
    from gateway.config import ConfigError, load_config
    from gateway.shared_buckets import SharedBuckets

    log = logging.getLogger("tfgate.gateway")
    try:
        workers = primary.worker_count(load_config(config).workers)
    except ConfigError as error:
        log.error("cannot start: %s", error)
        return 1
    gateway: app.Gateway | primary.Primary
    store = None
    if ready_file is None and workers > 1:
        gateway = primary.Primary(config, workers, grace_s)
    else:
        store = SharedBuckets.open(shared_rate_limits) if shared_rate_limits is not None else None
        gateway = app.Gateway(config, watch_file=ready_file is None, reuse_port=ready_file is not None,
                              rate_store=store)
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
    failure = starting.exception()
    if failure is not None:
        stopping.cancel()
        if isinstance(failure, (app.StartupError, primary.StartupError)):
            log.error("cannot start: %s", failure)
            return 1
        raise failure
    # What start-up made (config, TLS, gRPC, descriptors: ~50k objects) lives on: frozen, it is left out of garbage
    # collections, which then pause requests for about a millisecond instead of ~20.
    gc.freeze()
    if ready_file is not None:
        staging = ready_file.with_suffix(".tmp")
        staging.write_text(str(gateway.admin_port))
        staging.replace(ready_file)
    if on_ready is not None:
        on_ready(gateway)
    await stopping
    log.info("stopping: draining in-flight requests (up to %.1f s)", grace_s)
    await gateway.stop(grace_s)
    if store is not None:
        store.close()
    return 0


def configure_logging(worker_index: int | None = None) -> None:
    """The server's own log lines go to stderr; stdout carries the JSON access lines (gateway/accesslog.py). The
    workers of one gateway share its stderr and each logs what it sees (a backend turning unhealthy, a reload), so
    their lines name the worker: otherwise one event reads as the same line repeated."""
    worker = "" if worker_index is None else f" [worker {worker_index}]"
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s %(name)s{worker}: %(message)s")


def run(args: argparse.Namespace) -> int:
    configure_logging(args.worker_index)
    return uvloop.run(serve(args.config, args.grace_s, ready_file=args.worker_ready_file,
                            shared_rate_limits=args.shared_rate_limits))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
