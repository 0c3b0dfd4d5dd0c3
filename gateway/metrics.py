"""The gateway's Prometheus metrics, declared in one place on a registry passed in (tests read values from it).

Label cardinality is bounded by the config: models (as routed), routes, pools and upstream addresses; status codes.
Children are cached per label set, since `labels()` takes a lock and builds a key on every call.
"""

from __future__ import annotations

from typing import Any, Literal

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from backend.loop_metrics import GaugeCount, LoopCounter, LoopGauge, LoopHistogram, LoopMetrics

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UpstreamState = Literal["healthy", "unhealthy", "ejected"]
STATES: tuple[UpstreamState, ...] = ("healthy", "unhealthy", "ejected")
WorkerState = Literal["starting", "ready", "backoff", "failed", "stopped"]  # a fleet worker's (gateway/fleet.py)
WORKER_STATES: tuple[WorkerState, ...] = ("starting", "ready", "backoff", "failed", "stopped")


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        reg = self.registry
        # The request path's metrics: lock-free, on the event loop thread (backend/loop_metrics.py).
        self._requests = LoopCounter("tfgate_gateway_requests", "Requests answered, by model, route, status (an HTTP "
                                     "status, or a gRPC status name), the upstream that answered (\"\" when none "
                                     "did) and protocol (rest or grpc).",
                                     ["model", "route", "code", "upstream", "protocol"])
        self._duration = LoopHistogram("tfgate_gateway_request_duration_seconds", "Time from a complete request to "
                                       "its answer, through the gateway.", ["model", "route"], _LATENCY_BUCKETS)
        self._upstream_duration = LoopHistogram("tfgate_gateway_upstream_duration_seconds", "Time of each attempt "
                                                "at a backend.", ["pool", "upstream"], _LATENCY_BUCKETS)
        self._in_flight = LoopGauge("tfgate_gateway_requests_in_flight", "Requests being answered.", [])
        self._in_flight.set((), 0)
        self.in_flight = GaugeCount(self._in_flight)  # `with metrics.in_flight:`
        reg.register(LoopMetrics(self._requests, self._duration, self._upstream_duration, self._in_flight))
        self._state = Gauge("tfgate_gateway_upstream_state", "1 for the state each backend is in.",
                            ["pool", "upstream", "state"], registry=reg)
        self._ejections = Counter("tfgate_gateway_upstream_ejections", "Outlier ejections of a backend after "
                                  "consecutive failures.", ["pool", "upstream"], registry=reg)
        self._retries = Counter("tfgate_gateway_retries", "Retries of a failed attempt on another backend.",
                                ["pool"], registry=reg)
        self._retries_refused = Counter("tfgate_gateway_retries_over_budget", "Retries the pool's retry budget "
                                        "refused.", ["pool"], registry=reg)
        self._auth_failures = Counter("tfgate_gateway_auth_failures", "Requests refused before routing: 401 (no or "
                                      "bad credentials) or 403 (not granted).", ["code"], registry=reg)
        self._rate_limit = LoopCounter("tfgate_gateway_rate_limit_decisions", "Rate-limit decisions by principal "
                                       "(a key or certificate rule's name, \"jwt\" or \"anonymous\"), route and "
                                       "result (allowed or limited).", ["principal", "route", "result"])
        self._access_dropped = LoopCounter("tfgate_gateway_access_log_dropped_lines", "Access-log lines dropped "
                                           "because the reader of the gateway's stdout was not keeping up.", [])
        self._access_dropped.inc((), 0)
        reg.register(LoopMetrics(self._rate_limit, self._access_dropped))
        self._reloads = Counter("tfgate_gateway_config_reloads", "Config reloads, by result.", ["result"],
                                registry=reg)
        self._config_ok = Gauge("tfgate_gateway_config_last_reload_successful", "Whether the last reload applied "
                                "(1) or was rejected (0).", registry=reg)
        self._config_ok.set(1)
        for result in ("success", "failure"):
            self._reloads.labels(result)
        self._fleet_state = Gauge("tfgate_fleet_worker_state", "1 for the state each fleet worker is in (starting, "
                                  "ready, backoff after a crash, failed: a crash loop given up, stopped).",
                                  ["pool", "worker", "state"], registry=reg)
        self._fleet_restarts = Counter("tfgate_fleet_worker_restarts", "Restarts of a fleet worker after it "
                                       "exited or failed to become ready.", ["pool", "worker"], registry=reg)
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(self, *, model: str, route: str, status: int | str, upstream: str, seconds: float,
                        protocol: str = "rest") -> None:
        self._requests.inc((model, route, str(status), upstream, protocol))
        self._duration.observe((model, route), seconds)

    def observe_attempt(self, *, pool: str, upstream: str, seconds: float) -> None:
        self._upstream_duration.observe((pool, upstream), seconds)

    def set_state(self, *, pool: str, upstream: str, state: UpstreamState) -> None:
        for each in STATES:
            self._child(self._state, pool, upstream, each).set(1 if each == state else 0)

    def forget_upstream(self, *, pool: str, upstream: str) -> None:
        """A backend that left the config stops being exported."""
        for metric in (self._state, self._ejections):
            metric.remove_by_labels({"pool": pool, "upstream": upstream})
        self._upstream_duration.remove_matching("upstream", upstream)
        self._children = {key: child for key, child in self._children.items() if upstream not in key[1:]}

    def ejected(self, *, pool: str, upstream: str) -> None:
        self._child(self._ejections, pool, upstream).inc()

    def auth_failed(self, *, status: int) -> None:
        self._child(self._auth_failures, str(status)).inc()

    def rate_limited(self, *, principal: str, route: str, allowed: bool) -> None:
        self._rate_limit.inc((principal, route, "allowed" if allowed else "limited"))

    def access_lines_dropped(self, lines: int) -> None:
        self._access_dropped.inc((), lines)

    def retried(self, pool: str) -> None:
        self._child(self._retries, pool).inc()

    def retry_refused(self, pool: str) -> None:
        self._child(self._retries_refused, pool).inc()

    def reloaded(self, ok: bool) -> None:
        self._reloads.labels("success" if ok else "failure").inc()
        self._config_ok.set(1 if ok else 0)

    def fleet_state(self, *, pool: str, worker: str, state: WorkerState) -> None:
        for each in WORKER_STATES:
            self._fleet_state.labels(pool, worker, each).set(1 if each == state else 0)

    def fleet_restarted(self, *, pool: str, worker: str) -> None:
        self._fleet_restarts.labels(pool, worker).inc()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
