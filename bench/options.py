"""The command-line options every closed-loop benchmark shares, so they read and behave the same in each."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_loop_options(parser: argparse.ArgumentParser, default_out: Path) -> None:
    parser.add_argument("--seconds", type=_positive_float, default=10.0, help="measured time of each loop")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured time before each loop")
    parser.add_argument("--out", type=Path, default=default_out, help="JSON results (default: bench/results/)")


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value
