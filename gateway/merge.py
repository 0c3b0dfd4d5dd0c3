"""The whole gateway's metrics and backends, merged from its workers' (`workers: N`).

Each worker process has its own Prometheus registry and its own view of the backends; the primary fetches every
worker's /metrics text and /admin/backends document and merges them here, so the one admin API reports the gateway,
not one worker. Pure functions, no I/O: the caller fetches, and decides what to do with a worker that answered badly.

Expositions (text format 0.0.4) are read by prometheus_client's parser and written back by its `generate_latest`,
so escaping and float formatting are the library's. Samples are grouped by (sample name, labels) and merged by:
- `_created`: the minimum, the earliest worker's start;
- counters, histograms (`_bucket`, `_count`, `_sum`) and summaries (`_count`, `_sum`): the sum;
- gauges whose metric name ends with `_in_flight`: the sum, since work in progress adds up across workers;
- every other gauge, and info, stateset and untyped samples: the maximum. State gauges are 0/1 per worker
  (`tfgate_gateway_upstream_state{state=...}`, `..._last_reload_successful`), so 1 means "some worker sees it so";
- summary quantiles (which cannot be merged from their values): the maximum, an upper bound of the merged quantile.

What it guarantees: every family any worker has is output, with the HELP and TYPE of the first worker that has it;
families and samples come in first-seen order, except that a histogram's series lists its buckets by ascending `le`
(`+Inf` last) before its other samples. Buckets stay cumulative even if workers' bucket layouts differ: a worker
counts at a bound it lacks what it has at its next lower bound (a lower bound of its true count). The output parses
again and passes `promtool check metrics`. Timestamps are dropped: a merged value has no single time.

Backends documents (`Upstreams.describe`'s shape, under "pools") are merged per pool and per backend (by "rest"):
counts and connections add up, `ewma_ms` is the slowest view, `state` the worst (ejected, unhealthy, healthy).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

Pairs = tuple[tuple[str, str], ...]  # a sample's labels, sorted
Key = tuple[str, Pairs]  # (sample name, labels)
Rule = Callable[[Iterable[float]], float]

_ADDITIVE = frozenset({"counter", "histogram", "gaugehistogram", "summary"})
_HISTOGRAMS = frozenset({"histogram", "gaugehistogram"})
_ADDED_FIELDS = ("in_flight", "requests", "failures", "ejections")


def _total(values: Iterable[float]) -> float:
    return float(sum(values))


@dataclass
class _Family:
    first: Metric  # the first worker's family: its name, HELP and TYPE are the output's
    values: dict[Key, list[tuple[int, float]]] = field(default_factory=dict)  # (worker, value) per sample

    def rule(self, sample_name: str) -> Rule:
        kind, name = self.first.type, self.first.name
        if sample_name.endswith("_created"):
            return min
        if kind == "gauge":
            return _total if name.endswith("_in_flight") else max
        if kind in _ADDITIVE and not (kind == "summary" and sample_name == name):
            return _total
        return max

    def merged(self) -> Metric:
        """The output family: each sample merged by its rule, a histogram's buckets by `_merge_buckets`."""
        metric = Metric(self.first.name, self.first.documentation, self.first.type)
        bucket = f"{self.first.name}_bucket" if self.first.type in _HISTOGRAMS else None
        samples = {key: self.rule(key[0])(value for _, value in values)
                   for key, values in self.values.items() if key[0] != bucket}
        if bucket is not None:
            samples |= _merge_buckets(bucket, {key: values for key, values in self.values.items() if key[0] == bucket})
            samples = _histogram_order(bucket, list(self.values), samples)
        for (name, labels), value in samples.items():
            metric.add_sample(name, dict(labels), value)
        return metric


class _Merged(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)


def merge_expositions(texts: Sequence[str], first_only: tuple[str, ...] = ()) -> str:
    """One exposition for the whole gateway from every worker's (see the module docstring for the rules). Families
    whose names start with one of `first_only` are taken from the first text alone (the primary's own state, such
    as its config generation, which the workers' copies would only repeat).

    Raises ValueError naming the worker (its index in `texts`) whose text does not parse, or disagrees with an
    earlier worker's on a family's type or on which family a sample belongs to.
    """
    families: dict[str, _Family] = {}
    owners: dict[str, str] = {}  # sample name → its family's: two families writing one name would not parse
    for worker, text in enumerate(texts):
        for metric in _parse(worker, text):
            if worker and first_only and metric.name.startswith(first_only):
                continue
            family = families.setdefault(metric.name, _Family(metric))
            if family.first.type != metric.type:
                raise ValueError(f"worker {worker}: {metric.name} is a {metric.type}, "
                                 f"an earlier worker's is a {family.first.type}")
            for sample in metric.samples:
                if owners.setdefault(sample.name, metric.name) != metric.name:
                    raise ValueError(f"worker {worker}: {sample.name} is in {metric.name}, "
                                     f"an earlier worker's is in {owners[sample.name]}")
                key = (sample.name, tuple(sorted(sample.labels.items())))
                family.values.setdefault(key, []).append((worker, sample.value))
    return generate_latest(_Merged([family.merged() for family in families.values()])).decode()


def _parse(worker: int, text: str) -> list[Metric]:
    """The worker's families, with every histogram bucket's `le` checked: the merge orders buckets by it."""
    try:
        metrics = list(text_string_to_metric_families(text))
        for metric in metrics:
            if metric.type in _HISTOGRAMS:
                for sample in metric.samples:
                    if sample.name == f"{metric.name}_bucket":
                        _le(tuple(sample.labels.items()))
    except (ValueError, KeyError) as error:
        raise ValueError(f"worker {worker}: metrics text does not parse: {error!r}") from error
    return metrics


def _le(labels: Pairs) -> float:
    return float(dict(labels)["le"])


def _without_le(labels: Pairs) -> Pairs:
    return tuple(pair for pair in labels if pair[0] != "le")


def _merge_buckets(name: str, buckets: Mapping[Key, list[tuple[int, float]]]) -> dict[Key, float]:
    """Per series, every worker's bounds, ascending; at each, the sum of what each worker counts up to it.

    A worker lacking a bound counts there what it has at its next lower bound, so the merged buckets stay
    cumulative (and the `+Inf` bucket equals the merged `_count`) whatever layouts the workers have.
    """
    spellings: dict[Pairs, dict[float, str]] = {}  # per series, each bound's first-seen `le` text
    counts: dict[Pairs, dict[int, dict[float, float]]] = {}  # per series, per worker, count at each bound
    for (_, labels), values in buckets.items():
        series, le = _without_le(labels), dict(labels)["le"]
        spellings.setdefault(series, {}).setdefault(float(le), le)
        for worker, count in values:
            counts.setdefault(series, {}).setdefault(worker, {})[float(le)] = count
    merged: dict[Key, float] = {}
    for series, les in spellings.items():
        workers = [(sorted(own), own) for own in counts[series].values()]
        for bound in sorted(les):
            total = 0.0
            for bounds, own in workers:
                below = bisect.bisect_right(bounds, bound)
                total += own[bounds[below - 1]] if below else 0.0
            merged[(name, tuple(sorted((*series, ("le", les[bound])))))] = total
    return merged


def _histogram_order(bucket: str, seen: Sequence[Key], samples: Mapping[Key, float]) -> dict[Key, float]:
    """Series in first-seen order; in each, its buckets by ascending `le` (`+Inf` last), then its other samples."""
    series = {labels: index for index, labels in enumerate(dict.fromkeys(_without_le(labels) for _, labels in seen))}
    position = {key: index for index, key in enumerate(seen)}

    def place(key: Key) -> tuple[int, bool, float]:
        name, labels = key
        return series[_without_le(labels)], name != bucket, _le(labels) if name == bucket else position[key]

    return {key: samples[key] for key in sorted(samples, key=place)}


def merge_backends(documents: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One /admin/backends document for the whole gateway from every worker's "pools" (other keys are ignored).

    Per pool and per backend (by "rest", first-seen order; one only some workers know, mid-reload, is listed):
    counts, in-flight and connections add up; `ewma_ms` is the maximum, the slowest view; `state` is "ejected" if
    any worker says so, else "unhealthy" if any does, else "healthy"; other fields (`grpc`) are the first worker's.
    "workers" says how many documents were merged.
    """
    views: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for document in documents:
        for pool, backends in document["pools"].items():
            for backend in backends:
                views.setdefault(pool, {}).setdefault(backend["rest"], []).append(backend)
    return {"pools": {pool: [_merge_backend(seen) for seen in backends.values()] for pool, backends in views.items()},
            "workers": len(documents)}


def _merge_backend(views: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One backend as every worker that knows it sees it."""
    states = {view["state"] for view in views}
    merged = dict(views[0])
    merged.update({name: sum(view[name] for view in views) for name in _ADDED_FIELDS})
    merged["state"] = next((state for state in ("ejected", "unhealthy") if state in states), "healthy")
    merged["ewma_ms"] = max(view["ewma_ms"] for view in views)
    merged["connections"] = {name: sum(view["connections"][name] for view in views) for name in ("open", "idle")}
    return merged
