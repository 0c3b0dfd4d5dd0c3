"""What a benchmark hands back: a fixed-width table on stdout, failures on stderr and a JSON document on disk."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.wakeup import cold_pass_ratio, thread_wakeup_us


@dataclass(frozen=True, slots=True)
class Column:
    """A right-aligned table column: its title, width and how to print it from one result summary."""

    title: str
    width: int
    cell: Callable[[Mapping[str, Any]], str]


def latency_column(key: str, unit: str = "us", width: int = 10) -> Column:
    """One latency percentile (`latency_us[key]`), printed in microseconds or milliseconds."""
    scale, decimals = (1.0, 1) if unit == "us" else (1e3, 2)

    def cell(summary: Mapping[str, Any]) -> str:
        value = summary["latency_us"][key]
        return number(None if value is None else value / scale, decimals)

    return Column(f"{key} {unit}", width, cell)


LATENCY_COLUMNS = (
    Column("requests/s", 12, lambda summary: number(summary["requests_per_s"])),
    *(latency_column(key) for key in ("p50", "p90", "p99")),
    Column("count", 10, lambda summary: str(summary["count"])),
    Column("errors", 8, lambda summary: str(summary["errors"])),
)


def format_table(rows: Sequence[tuple[Sequence[str], Mapping[str, Any]]], headers: Sequence[str] = ("",),
                 columns: Sequence[Column] = LATENCY_COLUMNS) -> str:
    """One line per result summary (`LatencyRecorder.summary()` and what a benchmark adds), after its labels (one
    left-aligned column per header)."""
    widths = [max(len(header), *(len(labels[i]) for labels, _ in rows)) + 2 for i, header in enumerate(headers)]
    lines = ["".join(header.ljust(width) for header, width in zip(headers, widths))
             + "".join(column.title.rjust(column.width) for column in columns)]
    for labels, summary in rows:
        lines.append("".join(label.ljust(width) for label, width in zip(labels, widths))
                     + "".join(column.cell(summary).rjust(column.width) for column in columns))
    return "\n".join(lines)


def format_ratios(title: str, ratios: Mapping[str, float | None]) -> str:
    return f"{title}: " + ", ".join(f"{name} = {number(value, 3)}" for name, value in ratios.items())


def share_column(title: str, key: str, width: int = 13) -> Column:
    """A CPU share of one core (`summary[key]`, as 0.42 for 42%), "-" where it was not measured."""
    return Column(title, width, lambda summary: "-" if summary.get(key) is None else f"{summary[key]:.0%}")


def number(value: float | None, decimals: int = 1) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """None when either figure is missing (a loop with no successful request has no percentiles) or would divide by
    zero."""
    return numerator / denominator if numerator is not None and denominator else None


def print_errors(rows: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
    """On stderr, for each labelled summary that counted errors: how many, and the first one in full."""
    for label, summary in rows:
        if summary["errors"]:
            print(f"{label}: {summary['errors']} errors, first: {summary['first_error']}", file=sys.stderr)


def environment() -> dict[str, Any]:
    """Enough about the machine to tell two result files apart, and what a thread pays on it for having slept
    (bench/wakeup.py)."""
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "thread_wakeup_us": thread_wakeup_us(), "cold_pass_ratio": cold_pass_ratio()}


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def print_contenders(results: Sequence[Mapping[str, Any]], skipped: Mapping[str, str], columns: Sequence[Column],
                     names: Mapping[str, str]) -> None:
    """The table of a scenario's contenders, one row per result, then each skipped contender with its reason."""
    print(format_table([((result["label"],), result) for result in results], headers=("contender",), columns=columns))
    for contender, reason in skipped.items():
        print(f"{names[contender]}: skipped: {reason}")


def verdict(met: bool | None) -> str:
    """How a target line ends: met, NOT met, or unknown when a figure it needs was not measured."""
    return {True: "met", False: "NOT met", None: "unknown"}[met]
