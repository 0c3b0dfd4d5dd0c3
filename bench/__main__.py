"""`python -m bench BENCHMARK`: tfgate's benchmarks, one subcommand each (`--help` lists them)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from types import FrameType

import bench
from bench import backend_efficiency, degraded_backend, gateway_overhead, grpc_vs_rest, load_command, rest_latency


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=bench.__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="BENCHMARK")
    rest_latency.add_command(commands)
    grpc_vs_rest.add_command(commands)
    load_command.add_command(commands)
    backend_efficiency.add_command(commands)
    gateway_overhead.add_command(commands)
    degraded_backend.add_command(commands)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's first import, as the backend does
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    """Turn SIGTERM into SystemExit so every `with` unwinds and a started backend is stopped, as on Ctrl-C."""
    sys.exit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
