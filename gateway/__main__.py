"""`python -m gateway --config configs/gateway.yaml` (also `tfgate gateway`): run the gateway until SIGTERM or
Ctrl-C, then drain in-flight requests within --grace-s and exit."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

import uvloop


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("configs/gateway.yaml"), help="the gateway's YAML")
    parser.add_argument("--grace-s", type=float, default=10.0,
                        help="on SIGTERM, how long in-flight requests may take to finish (default 10)")


async def serve(config: Path, grace_s: float) -> int:
    from gateway.app import Gateway, StartupError

    gateway = Gateway(config)
    try:
        await gateway.start()
    except StartupError as error:
        logging.getLogger("tfgate.gateway").error("cannot start: %s", error)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    logging.getLogger("tfgate.gateway").info("stopping: draining in-flight requests (up to %.1f s)", grace_s)
    await gateway.stop(grace_s)
    return 0


def run(args: argparse.Namespace) -> int:
    # The server's own log lines go to stderr; stdout carries only the JSON access lines (gateway/accesslog.py).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return uvloop.run(serve(args.config, args.grace_s))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
