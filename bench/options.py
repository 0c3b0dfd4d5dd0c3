"""The command-line options and argument types the benchmarks share, so they read and behave the same in each."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, TypeVar

from bench.rest_client import loopback_address

T = TypeVar("T")


def add_loop_options(parser: argparse.ArgumentParser, default_out: Path) -> None:
    parser.add_argument("--seconds", type=positive_float, default=10.0, help="measured time of each loop")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured time before each loop")
    parser.add_argument("--out", type=Path, default=default_out, help="JSON results (default: bench/results/)")


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def comma_list(parse: Callable[[str], T]) -> Callable[[str], list[T]]:
    """An argument type for `1,8,64`."""
    def parse_list(text: str) -> list[T]:
        return [parse(item) for item in text.split(",")]

    return parse_list


def loopback_url(*schemes: str) -> Callable[[str], str]:
    """An argument type accepting only a URL on this machine (see rest_client.loopback_address)."""
    def parse(text: str) -> str:
        try:
            loopback_address(text, schemes)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text.rstrip("/")

    return parse
