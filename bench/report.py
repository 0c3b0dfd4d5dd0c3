"""What a benchmark hands back: a fixed-width table on stdout, failures on stderr and a JSON document on disk."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

_COLUMNS = (("requests/s", 12), ("p50 us", 10), ("p90 us", 10), ("p99 us", 10), ("count", 10), ("errors", 8))


def format_table(rows: Sequence[tuple[Sequence[str], Mapping[str, Any]]], headers: Sequence[str] = ("",)) -> str:
    """One line per `LatencyRecorder.summary()`, after its labels (one column per header); latencies in
    microseconds, as the headers say."""
    widths = [max(len(header), *(len(labels[i]) for labels, _ in rows)) + 2 for i, header in enumerate(headers)]
    lines = ["".join(header.ljust(width) for header, width in zip(headers, widths))
             + "".join(name.rjust(size) for name, size in _COLUMNS)]
    for labels, summary in rows:
        latency = summary["latency_us"]
        cells = [_number(summary["requests_per_s"]), *(_number(latency[key]) for key in ("p50", "p90", "p99")),
                 str(summary["count"]), str(summary["errors"])]
        lines.append("".join(label.ljust(width) for label, width in zip(labels, widths))
                     + "".join(cell.rjust(size) for cell, (_, size) in zip(cells, _COLUMNS)))
    return "\n".join(lines)


def format_ratios(title: str, ratios: Mapping[str, float | None]) -> str:
    return f"{title}: " + ", ".join(f"{name} = {_number(value, 3)}" for name, value in ratios.items())


def _number(value: float | None, decimals: int = 1) -> str:
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
    """Enough about the machine to tell two result files apart."""
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
