"""A benchmark's picture: latency percentiles against throughput, one colour per series, one marker per percentile.

A series is one configuration measured at one or more loads (a sweep of rates or concurrencies draws a curve; a
single run draws one column of markers). Latency is on a log scale, since p99.9 is often ten times p50. matplotlib
is optional (the `bench` extra): without it the benchmark still runs and writes its JSON, and says why no PNG.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

PLOTTED: tuple[tuple[str, str, Literal["-", "--", ":"]], ...] = (("p50", "o", "-"), ("p99", "^", "--"),
                                                                  ("p99.9", "s", ":"))


def pyplot_for(path: Path) -> ModuleType | None:
    """matplotlib's pyplot, drawing to files only; None (with a note on stderr) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"no plot: matplotlib is not installed (pip install -e '.[bench]'); {path} not written", file=sys.stderr)
        return None
    matplotlib.use("Agg")  # files only, never a window
    from matplotlib import pyplot

    return pyplot


def plot_latency(path: Path, title: str, series: Mapping[str, Sequence[Mapping[str, Any]]], x_key: str,
                 x_label: str, point_label: Callable[[Mapping[str, Any]], str] | None = None,
                 ceiling: tuple[str, float] | None = None, log_x: bool = False) -> bool:
    """Write the PNG for result summaries grouped by series, each point's p50 annotated with `point_label`;
    False (with a note on stderr) without matplotlib."""
    pyplot = pyplot_for(path)
    if pyplot is None:
        return False
    from matplotlib import ticker
    from matplotlib.lines import Line2D

    figure, axes = pyplot.subplots(figsize=(12, 6), dpi=100)
    colours = pyplot.rcParams["axes.prop_cycle"].by_key()["color"]
    handles: list[Any] = []
    for index, (label, results) in enumerate(series.items()):
        colour = colours[index % len(colours)]
        measured = sorted((result for result in results if result["count"]), key=lambda result: result[x_key])
        for key, marker, style in PLOTTED:
            points = [(result[x_key], result["latency_us"][key] / 1e3) for result in measured]
            axes.plot(*zip(*points), marker=marker, linestyle=style, color=colour)
        if point_label is not None:
            for result in measured:
                axes.annotate(point_label(result), (result[x_key], result["latency_us"]["p50"] / 1e3),
                              textcoords="offset points", xytext=(4, -12), fontsize="x-small", color=colour)
        handles.append(Line2D([], [], color=colour, linewidth=6, label=label))
    if ceiling is not None:
        handles.append(axes.axvline(ceiling[1], color="grey", linestyle="-.", label=ceiling[0]))
    handles += [Line2D([], [], color="black", marker=marker, linestyle=style, label=key)
                for key, marker, style in PLOTTED]
    axes.set_yscale("log")
    if log_x:
        axes.set_xscale("log")
    else:
        axes.set_xlim(left=0)
    for axis in (axes.xaxis, axes.yaxis) if log_x else (axes.yaxis,):  # plain numbers at 1, 2, 5 × 10^k
        axis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
        axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        axis.set_minor_formatter(ticker.NullFormatter())
    axes.set_xlabel(f"{x_label} (log scale)" if log_x else x_label)
    axes.set_ylabel("latency (ms, log scale)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")  # keeps the legend beside the axes
    pyplot.close(figure)
    return True
