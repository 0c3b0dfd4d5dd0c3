"""What a benchmark hands back: a fixed-width table on stdout and a JSON document on disk."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Mapping, Sequence

_COLUMNS = (("requests/s", 12), ("p50 us", 10), ("p90 us", 10), ("p99 us", 10), ("count", 10), ("errors", 8))


def format_table(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """One line per `LatencyRecorder.summary()`; latencies in microseconds, as the headers say."""
    width = max(len(label) for label, _ in rows) + 2
    lines = ["".ljust(width) + "".join(name.rjust(size) for name, size in _COLUMNS)]
    for label, summary in rows:
        latency = summary["latency_us"]
        cells = [_number(summary["requests_per_s"]), *(_number(latency[key]) for key in ("p50", "p90", "p99")),
                 str(summary["count"]), str(summary["errors"])]
        lines.append(label.ljust(width) + "".join(cell.rjust(size) for cell, (_, size) in zip(cells, _COLUMNS)))
    return "\n".join(lines)


def format_ratios(title: str, ratios: Mapping[str, float | None]) -> str:
    return f"{title}: " + ", ".join(f"{name} = {_number(value, 3)}" for name, value in ratios.items())


def _number(value: float | None, decimals: int = 1) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def environment() -> dict[str, Any]:
    """Enough about the machine to tell two result files apart."""
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
