"""gateway.config: tables of config documents and the typed tree or the exact error each one gives."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from gateway.config import (
    ALL_METHODS,
    Backend,
    ConfigError,
    GatewayConfig,
    HealthCheck,
    HostPort,
    Limits,
    Listen,
    Outlier,
    Pool,
    Rate,
    Retries,
    Route,
    SplitTarget,
    TlsConfig,
    load_config,
    parse_config,
    redacted,
)
from gateway.config_fleet import FleetConfig, RestartConfig
from gateway.fleet import local_ports

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "gateway.yaml"
BASE_DIR = Path("/etc/tfgate")
DELETE = object()

BASE: dict[str, Any] = {
    "tls": {"cert": "server.pem", "key": "server-key.pem"},
    "pools": {"cpu": {"backends": [{"rest": "127.0.0.1:8601", "grpc": "127.0.0.1:8600"}, {"rest": "127.0.0.1:8611"}]}},
    "routes": [
        {"model": "half_plus_two", "pool": "cpu",
         "split": [{"version": 1, "weight": 90}, {"label": "canary", "weight": 10}]},
        {"model": "*", "pool": "cpu"},
    ],
}


def doc_with(*edits: tuple[tuple[str | int, ...], Any]) -> dict[str, Any]:
    """BASE with each (key path, value) set, creating mappings on the way; value DELETE removes the key."""
    doc = copy.deepcopy(BASE)
    for path, value in edits:
        node: Any = doc
        for part in path[:-1]:
            node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
        if value is DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return doc


def parse(doc: Any) -> GatewayConfig:
    return parse_config(yaml.safe_dump(doc, sort_keys=False), base_dir=BASE_DIR)


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=BASE_DIR)
    return str(info.value)


CPU = ("pools", "cpu")
FLEET = ("fleet",)
MINIMAL_FLEET = ((FLEET + ("pool",), "cpu"), (FLEET + ("model_config_file",), "models.config"))  # edits for doc_with
NO_BACKENDS = "needs at least one backend (only the fleet's pool may have none)"

DEFAULTS = GatewayConfig(
    tls=TlsConfig(cert=BASE_DIR / "server.pem", key=BASE_DIR / "server-key.pem"),
    pools={"cpu": Pool(name="cpu", backends=(
        Backend(HostPort("127.0.0.1", 8601), HostPort("127.0.0.1", 8600)), Backend(HostPort("127.0.0.1", 8611))))},
    routes=(Route("half_plus_two", "cpu", (SplitTarget(90, version=1), SplitTarget(10, label="canary"))),
            Route("*", "cpu")),
)


def test_defaults() -> None:
    config = parse(BASE)
    assert config == DEFAULTS
    assert config.listen == Listen(HostPort("0.0.0.0", 8443), HostPort("127.0.0.1", 9901))
    assert config.limits == Limits(max_body_bytes=16 * 1024 * 1024, header_timeout_s=10, request_timeout_s=30,
                                   idle_timeout_s=75)
    pool = config.pools["cpu"]
    assert (pool.balancer, pool.panic_threshold_percent) == ("least_latency", 50)
    assert pool.health_check == HealthCheck(interval_s=2, timeout_s=1, unhealthy_threshold=2, healthy_threshold=1,
                                            path="/v2/health/ready", jitter_percent=10)
    assert pool.outlier == Outlier(consecutive_failures=5, ejection_s=30, max_ejection_s=300, max_ejected_percent=50)
    assert pool.retries == Retries(attempts=2, budget_percent=20, min_retries_per_s=3)
    assert (config.tls.client_ca, config.tls.client_cert) == (None, "none")
    assert config.expose_upstream_header is False
    assert config.source == "<text>"


def test_example_file_parses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # the cert files need not exist, and relative paths follow the working directory
    config = load_config(EXAMPLE)
    assert config.source == str(EXAMPLE)
    assert config.listen == Listen(HostPort("0.0.0.0", 8443), HostPort("127.0.0.1", 9901), HostPort("0.0.0.0", 8500))
    assert config.tls == TlsConfig(cert=tmp_path / "certs/server.pem", key=tmp_path / "certs/server-key.pem",
                                   client_ca=tmp_path / "certs/ca.pem", client_cert="none")
    assert config.limits == Limits(16777216, 10, 30, 75)
    assert list(config.pools) == ["cpu"]
    pool = config.pools["cpu"]
    assert pool.balancer == "least_latency"
    assert pool.health_check == HealthCheck(2, 1, 2, 1, "/v2/health/ready", 10)
    assert pool.outlier == Outlier(5, 30, 300, 50)
    assert pool.retries == Retries(2, 20, 3)
    assert [str(b.rest) for b in pool.backends] == ["127.0.0.1:8601", "127.0.0.1:8611"]
    assert [str(b.grpc) for b in pool.backends] == ["127.0.0.1:8600", "127.0.0.1:8610"]
    assert config.routes == DEFAULTS.routes
    assert config.expose_upstream_header is False


@pytest.mark.parametrize(("edits", "check"), [
    pytest.param([(("listen", "https"), "[::]:0"), (("listen", "admin"), "[::1]:9901")],
                 lambda c: (c.listen.https, str(c.listen.https), str(c.listen.admin))
                 == (HostPort("::", 0), "[::]:0", "[::1]:9901"), id="ipv6-listen-and-any-port"),
    pytest.param([(CPU + ("backends",), [{"rest": "[fe80::1%eth0]:8601", "grpc": "[2001:db8::5]:8600"}])],
                 lambda c: [(str(b.rest), b.rest.host, str(b.grpc)) for b in c.pools["cpu"].backends]
                 == [("[fe80::1%eth0]:8601", "fe80::1%eth0", "[2001:db8::5]:8600")], id="ipv6-backend"),
    pytest.param([(CPU + ("backends",), [{"rest": "localhost:8601"}, {"rest": "gpu-0.internal:1"}])],
                 lambda c: [str(b.rest) for b in c.pools["cpu"].backends] == ["localhost:8601", "gpu-0.internal:1"],
                 id="host-names"),
    pytest.param([(CPU + ("backends",), [{"rest": "127.0.0.1:65535"}])],
                 lambda c: c.pools["cpu"].backends[0].rest.port == 65535, id="highest-port"),
    pytest.param([(("tls", "client_ca"), "ca.pem"), (("tls", "client_cert"), "required")],
                 lambda c: (c.tls.client_ca, c.tls.client_cert) == (BASE_DIR / "ca.pem", "required"), id="mtls"),
    pytest.param([(("tls", "client_ca"), "ca.pem"), (("tls", "client_cert"), "optional")],
                 lambda c: c.tls.client_cert == "optional", id="mtls-optional"),
    pytest.param([(("tls", "cert"), "/abs/server.pem")], lambda c: c.tls.cert == Path("/abs/server.pem"),
                 id="absolute-path-kept"),
    pytest.param([(CPU + ("outlier", "ejection_s"), 600)],
                 lambda c: (c.pools["cpu"].outlier.ejection_s, c.pools["cpu"].outlier.max_ejection_s) == (600, 600),
                 id="max-ejection-default-follows-ejection"),
    pytest.param([(CPU + ("outlier", "max_ejection_s"), 30)], lambda c: c.pools["cpu"].outlier.max_ejection_s == 30,
                 id="max-ejection-equal-to-ejection"),
    pytest.param([(CPU + ("balancer",), "round_robin")], lambda c: c.pools["cpu"].balancer == "round_robin",
                 id="round-robin"),
    pytest.param([(("pools", "gpu"), {"backends": [{"rest": "127.0.0.1:8701"}]})],
                 lambda c: list(c.pools) == ["cpu", "gpu"] and c.pools["gpu"].name == "gpu",
                 id="second-pool"),
    pytest.param([(("routes", 0, "split"), [{"version": 0, "weight": 1}])],
                 lambda c: c.routes[0].split == (SplitTarget(1, version=0),), id="version-zero"),
    pytest.param([(("routes", 0, "split"), [])], lambda c: c.routes[0].split == (), id="empty-split"),
    pytest.param([(CPU + ("retries", "attempts"), 1), (CPU + ("retries", "min_retries_per_s"), 0)],
                 lambda c: c.pools["cpu"].retries == Retries(1, 20, 0), id="no-retries"),
    pytest.param([(CPU + ("health_check", "jitter_percent"), 0), (CPU + ("outlier", "max_ejected_percent"), 100),
                  (CPU + ("panic_threshold_percent",), 0.5)],
                 lambda c: (c.pools["cpu"].health_check.jitter_percent, c.pools["cpu"].outlier.max_ejected_percent,
                            c.pools["cpu"].panic_threshold_percent) == (0, 100, 0.5), id="percent-bounds"),
    pytest.param([(("limits", "request_timeout_s"), 0.25), (("expose_upstream_header",), True)],
                 lambda c: (c.limits.request_timeout_s, c.expose_upstream_header) == (0.25, True), id="limits"),
    # the fleet's pool, and only it, may have no backends
    pytest.param([*MINIMAL_FLEET, (CPU + ("backends",), DELETE)],
                 lambda c: (c.fleet.pool, c.pools["cpu"].backends) == ("cpu", ()), id="fleet-pool-without-backends"),
    pytest.param([*MINIMAL_FLEET, (CPU + ("backends",), [])],
                 lambda c: (c.fleet.pool, c.pools["cpu"].backends) == ("cpu", ()), id="fleet-pool-empty-backends"),
    pytest.param([*MINIMAL_FLEET, (FLEET + ("pool",), "gpu"), (("pools", "gpu"), {})],
                 lambda c: (c.fleet.pool, c.pools["gpu"].backends, len(c.pools["cpu"].backends)) == ("gpu", (), 2),
                 id="fleet-names-a-second-pool"),
    pytest.param([*MINIMAL_FLEET, (FLEET + ("gpus",), [0, 2])], lambda c: c.fleet.gpus == (0, 2), id="fleet-gpus"),
    pytest.param([*MINIMAL_FLEET, (FLEET + ("gpus",), [3])], lambda c: c.fleet.gpus == (3,), id="fleet-one-gpu"),
    pytest.param([*MINIMAL_FLEET, (FLEET + ("gpus",), "none")], lambda c: c.fleet.gpus == "none", id="fleet-no-gpus"),
    pytest.param([*MINIMAL_FLEET, (FLEET + ("gpus",), "auto")], lambda c: c.fleet.gpus == "auto", id="fleet-auto"),
    pytest.param([*MINIMAL_FLEET, (FLEET + ("gpus",), None), (FLEET + ("restart",), None)],
                 lambda c: (c.fleet.gpus, c.fleet.restart) == ("auto", RestartConfig()), id="fleet-nulls-default"),
    pytest.param([*MINIMAL_FLEET, (FLEET + ("model_config_file",), "/srv/models.config"),
                  (FLEET + ("log_dir",), "/var/log/tfgate")],
                 lambda c: (c.fleet.model_config_file, c.fleet.log_dir) == (Path("/srv/models.config"),
                                                                            Path("/var/log/tfgate")),
                 id="fleet-absolute-paths-kept"),
    pytest.param([*MINIMAL_FLEET, (FLEET + ("replicas",), 64), (FLEET + ("base_port",), 1),
                  (FLEET + ("log_backups",), 0), (FLEET + ("log_max_bytes",), 4096)],
                 lambda c: (c.fleet.replicas, c.fleet.base_port, c.fleet.log_backups, c.fleet.log_max_bytes)
                 == (64, 1, 0, 4096), id="fleet-bounds"),
    pytest.param([*MINIMAL_FLEET, (FLEET + ("restart",), {"initial_s": 5, "max_s": 5, "crash_loop_restarts": 0,
                                                          "healthy_after_s": 0})],
                 lambda c: c.fleet.restart == RestartConfig(5, 5, 0, 120, 0), id="fleet-restart-bounds"),
    pytest.param([*MINIMAL_FLEET, (FLEET + ("restart",), {"initial_s": 100})],
                 lambda c: (c.fleet.restart.initial_s, c.fleet.restart.max_s) == (100, 100),
                 id="fleet-restart-max-follows-a-larger-initial"),
    pytest.param([*MINIMAL_FLEET, (FLEET + ("flags",), ["--enable_model_warmup", "false",
                                                        "-file_system_poll_wait_seconds", "5", "--grace_period_s=5"])],
                 lambda c: c.fleet.flags == ("--enable_model_warmup", "false", "-file_system_poll_wait_seconds", "5",
                                             "--grace_period_s=5"), id="fleet-flags-kept-as-given"),
])
def test_valid(edits: list[tuple[tuple[str | int, ...], Any]], check: Any) -> None:
    assert check(parse(doc_with(*edits)))


POOLS_AND_ROUTES = "pools: {cpu: {backends: [{rest: '127.0.0.1:8601'}]}}\nroutes: [{model: '*', pool: cpu}]\n"


@pytest.mark.parametrize(("text", "check"), [
    pytest.param("tls: {cert: c, key: k, client_cert: none}\n", lambda c: c.tls.client_cert == "none",
                 id="unquoted-none-is-a-string"),
    pytest.param("tls: {cert: c, key: k, client_ca: ~, client_cert: null}\n",
                 lambda c: (c.tls.client_ca, c.tls.client_cert) == (None, "none"), id="null-means-default"),
    pytest.param("tls: {cert: c, key: k}\nlisten:\nlimits:\n  # all commented out\n",
                 lambda c: (c.listen, c.limits) == (Listen(), Limits()), id="empty-sections-take-defaults"),
    pytest.param("tls: {cert: c, key: k}\nexpose_upstream_header: yes\n", lambda c: c.expose_upstream_header is True,
                 id="yaml-1.1-boolean"),
    pytest.param("# comments only at the top\n---\ntls: {cert: c, key: k}\n", lambda c: c.tls.key == BASE_DIR / "k",
                 id="document-marker"),
    pytest.param("tls: {cert: c, key: k}\nfleet: {pool: cpu, model_config_file: m, gpus: none, replicas: ~}\n",
                 lambda c: (c.fleet.gpus, c.fleet.replicas) == ("none", None), id="fleet-unquoted-gpus-none"),
    pytest.param("tls: {cert: c, key: k}\nfleet:\n  # all commented out\n", lambda c: c.fleet is None,
                 id="empty-fleet-section-is-no-fleet"),
])
def test_yaml_details(text: str, check: Any) -> None:
    assert check(parse_config(text + POOLS_AND_ROUTES, base_dir=BASE_DIR))


def test_yaml_merge_keys_share_settings() -> None:
    config = parse_config(
        "tls: {cert: c, key: k}\nroutes: [{model: '*', pool: cpu}]\npools:\n"
        "  cpu: {health_check: &probe {interval_s: 5, timeout_s: 2}, backends: [{rest: '127.0.0.1:8601'}]}\n"
        "  gpu: {health_check: {<<: *probe, timeout_s: 3}, backends: [{rest: '127.0.0.1:8611'}]}\n")
    assert config.pools["cpu"].health_check == HealthCheck(interval_s=5, timeout_s=2)
    assert config.pools["gpu"].health_check == HealthCheck(interval_s=5, timeout_s=3)


R0, SPLIT0 = ("routes", 0), ("routes", 0, "split", 0)


@pytest.mark.parametrize(("edits", "message"), [
    # unknown keys, at every depth, with a hint when one is close
    ([(("listn",), {})], "listn: unknown key (did you mean 'listen'?)"),
    ([(("tls", "client_certs"), "required")], "tls.client_certs: unknown key (did you mean 'client_cert'?)"),
    ([(CPU + ("health_chek",), {"interval_s": 1})],
     "pools.cpu.health_chek: unknown key (did you mean 'health_check'?)"),
    ([(CPU + ("outlier", "ejection"), 1)], "pools.cpu.outlier.ejection: unknown key (did you mean 'ejection_s'?)"),
    ([(CPU + ("backends", 1, "http"), "127.0.0.1:1")],
     "pools.cpu.backends[1].http: unknown key; known keys: rest, grpc"),
    ([(SPLIT0 + ("wieght",), 3)], "routes[0].split[0].wieght: unknown key (did you mean 'weight'?)"),
    ([(R0 + ("timeout",), None)], "routes[0].timeout: unknown key; known keys: model, pool, split"),
    # missing keys
    ([(("tls",), DELETE)], "tls: required key is missing"),
    ([(("tls", "key"), DELETE)], "tls.key: required key is missing"),
    ([(("tls", "key"), None)], "tls.key: required key is missing"),
    ([(("routes",), DELETE)], "routes: required key is missing"),
    ([(CPU + ("backends",), DELETE)], f"pools.cpu.backends: {NO_BACKENDS}"),
    ([(("routes", 1, "pool"), DELETE)], "routes[1].pool: required key is missing"),
    ([(SPLIT0 + ("weight",), DELETE)], "routes[0].split[0].weight: required key is missing"),
    # wrong types and choices
    ([(CPU + ("balancer",), "fastest")],
     "pools.cpu.balancer: 'fastest' is not one of ['round_robin', 'least_latency']"),
    ([(("tls", "client_cert"), "maybe")], "tls.client_cert: 'maybe' is not one of ['none', 'optional', 'required']"),
    ([(("tls", "client_cert"), False)], "tls.client_cert: False is not one of ['none', 'optional', 'required']"),
    ([(("limits", "max_body_bytes"), "16MiB")], "limits.max_body_bytes: '16MiB' is not of type 'integer'"),
    ([(CPU + ("retries", "attempts"), 2.0)], "pools.cpu.retries.attempts: 2.0 is not of type 'integer'"),
    ([(CPU + ("health_check", "interval_s"), True)], "pools.cpu.health_check.interval_s: True is not of type 'number'"),
    ([(CPU + ("health_check", "timeout_s"), "1s")], "pools.cpu.health_check.timeout_s: '1s' is not of type 'number'"),
    ([(("expose_upstream_header",), "true")], "expose_upstream_header: 'true' is not of type 'boolean'"),
    ([(("listen", "https"), 8443)], "listen.https: 8443 is not of type 'string'"),
    ([(("pools",), [{"backends": []}])], "pools: [{'backends': []}] is not of type 'object'"),
    ([(("routes",), {"model": "*", "pool": "cpu"})], "routes: {'model': '*', 'pool': 'cpu'} is not of type 'array'"),
    ([(("tls",), "server.pem")], "tls: 'server.pem' is not of type 'object'"),
    ([(CPU, None)], "pools.cpu: None is not of type 'object'"),
    ([(SPLIT0 + ("label",), 2), (SPLIT0 + ("version",), DELETE)],
     "routes[0].split[0].label: 2 is not of type 'string'"),
    ([(CPU + ("health_check", "path"), "health")], "pools.cpu.health_check.path: 'health' does not match '^/[^\\\\s]*$'"),
    ([(("tls", "cert"), "")], "tls.cert: '' should be non-empty"),
    ([(("pools", ""), {"backends": [{"rest": "127.0.0.1:1"}]})], "pools: names here are non-empty strings, not ''"),
    # empty collections
    ([(("pools",), {})], "pools: {} should be non-empty"),
    ([(("routes",), [])], "routes: [] should be non-empty"),
    ([(CPU + ("backends",), [])], f"pools.cpu.backends: {NO_BACKENDS}"),
    # ranges: durations > 0, thresholds >= 1, percents in [0, 100], attempts >= 1, weights > 0, versions >= 0
    ([(("limits", "header_timeout_s"), 0)], "limits.header_timeout_s: 0 is less than or equal to the minimum of 0"),
    ([(("limits", "request_timeout_s"), -1)], "limits.request_timeout_s: -1 is less than or equal to the minimum of 0"),
    ([(("limits", "idle_timeout_s"), 0)], "limits.idle_timeout_s: 0 is less than or equal to the minimum of 0"),
    ([(("limits", "max_body_bytes"), 0)], "limits.max_body_bytes: 0 is less than the minimum of 1"),
    ([(CPU + ("health_check", "interval_s"), 0)],
     "pools.cpu.health_check.interval_s: 0 is less than or equal to the minimum of 0"),
    ([(CPU + ("health_check", "timeout_s"), 0.0)],
     "pools.cpu.health_check.timeout_s: 0.0 is less than or equal to the minimum of 0"),
    ([(CPU + ("outlier", "ejection_s"), 0)],
     "pools.cpu.outlier.ejection_s: 0 is less than or equal to the minimum of 0"),
    ([(CPU + ("outlier", "max_ejection_s"), 0)],
     "pools.cpu.outlier.max_ejection_s: 0 is less than or equal to the minimum of 0"),
    ([(CPU + ("health_check", "unhealthy_threshold"), 0)],
     "pools.cpu.health_check.unhealthy_threshold: 0 is less than the minimum of 1"),
    ([(CPU + ("health_check", "healthy_threshold"), 0)],
     "pools.cpu.health_check.healthy_threshold: 0 is less than the minimum of 1"),
    ([(CPU + ("outlier", "consecutive_failures"), 0)],
     "pools.cpu.outlier.consecutive_failures: 0 is less than the minimum of 1"),
    ([(CPU + ("outlier", "max_ejected_percent"), 101)],
     "pools.cpu.outlier.max_ejected_percent: 101 is greater than the maximum of 100"),
    ([(CPU + ("health_check", "jitter_percent"), -5)],
     "pools.cpu.health_check.jitter_percent: -5 is less than the minimum of 0"),
    ([(CPU + ("retries", "budget_percent"), 100.5)],
     "pools.cpu.retries.budget_percent: 100.5 is greater than the maximum of 100"),
    ([(CPU + ("panic_threshold_percent",), -1)], "pools.cpu.panic_threshold_percent: -1 is less than the minimum of 0"),
    ([(CPU + ("retries", "attempts"), 0)], "pools.cpu.retries.attempts: 0 is less than the minimum of 1"),
    ([(CPU + ("retries", "min_retries_per_s"), -1)],
     "pools.cpu.retries.min_retries_per_s: -1 is less than the minimum of 0"),
    ([(SPLIT0 + ("weight",), 0)], "routes[0].split[0].weight: 0 is less than the minimum of 1"),
    ([(("routes", 0, "split", 1, "weight"), -10)], "routes[0].split[1].weight: -10 is less than the minimum of 1"),
    ([(SPLIT0 + ("version",), -1)], "routes[0].split[0].version: -1 is less than the minimum of 0"),
    ([(("routes", 0, "split", 1, "label"), "")], "routes[0].split[1].label: '' should be non-empty"),
    ([(CPU + ("health_check", "interval_s"), float("nan"))],
     "pools.cpu.health_check.interval_s: must be a finite number"),
    ([(("limits", "request_timeout_s"), float("inf"))], "limits.request_timeout_s: must be a finite number"),
    # semantic rules
    ([(CPU + ("outlier", "max_ejection_s"), 10)], "pools.cpu.outlier.max_ejection_s: must be at least ejection_s (30)"),
    ([(("tls", "client_cert"), "required")],
     "tls.client_cert: client_cert 'required' needs tls.client_ca to verify clients with"),
    ([(("tls", "client_cert"), "optional")],
     "tls.client_cert: client_cert 'optional' needs tls.client_ca to verify clients with"),
    ([(("routes", 1, "pool"), "gpu")], "routes[1].pool: no pool named 'gpu' (pools: cpu)"),
    ([(("routes", 1, "model"), "half_plus_two")],
     "routes[1].model: model 'half_plus_two' already has a route, routes[0]"),
    ([(("routes",), [*BASE["routes"], {"model": "*", "pool": "gpu"}])],
     "routes[2].model: model '*' already has a route, routes[1]"),
    ([(SPLIT0 + ("label",), "stable")], "routes[0].split[0]: needs exactly one of version, label"),
    ([(SPLIT0 + ("version",), DELETE)], "routes[0].split[0]: needs exactly one of version, label"),
    ([(("routes", 0, "split", 1), {"version": 1, "weight": 10})], "routes[0].split[1]: version 1 is listed twice"),
    ([(("routes", 0, "split", 0), {"label": "canary", "weight": 10})],
     "routes[0].split[1]: label 'canary' is listed twice"),
    ([(CPU + ("backends", 1, "rest"), "127.0.0.1:8601")],
     "pools.cpu.backends[1].rest: 127.0.0.1:8601 is already pools.cpu.backends[0]"),
    ([(("listen", "admin"), "0.0.0.0:8443")], "listen.admin: 0.0.0.0:8443 is also listen.https"),
    # the fleet: its pool, its required keys, unknown keys
    ([*MINIMAL_FLEET, (FLEET + ("pool",), "gpu")], "fleet.pool: no pool named 'gpu' (pools: cpu)"),
    ([(FLEET + ("pool",), "cpu")], "fleet.model_config_file: required key is missing"),
    ([(FLEET + ("model_config_file",), "models.config")], "fleet.pool: required key is missing"),
    ([*MINIMAL_FLEET, (FLEET + ("model_config_file",), "")], "fleet.model_config_file: '' should be non-empty"),
    ([*MINIMAL_FLEET, (FLEET + ("replica",), 2)], "fleet.replica: unknown key (did you mean 'replicas'?)"),
    ([*MINIMAL_FLEET, (FLEET + ("restart", "max"), 2)], "fleet.restart.max: unknown key (did you mean 'max_s'?)"),
    # only the fleet's pool may have no backends
    ([*MINIMAL_FLEET, (("pools", "gpu"), {})], f"pools.gpu.backends: {NO_BACKENDS}"),
    ([*MINIMAL_FLEET, (("pools", "gpu"), {"backends": []})], f"pools.gpu.backends: {NO_BACKENDS}"),
    ([*MINIMAL_FLEET, (FLEET + ("pool",), "gpu"), (("pools", "gpu"), {}), (CPU + ("backends",), DELETE)],
     f"pools.cpu.backends: {NO_BACKENDS}"),
    # the fleet's values
    ([*MINIMAL_FLEET, (FLEET + ("gpus",), "some")], "fleet.gpus: 'some' is not valid under any of the given schemas"),
    ([*MINIMAL_FLEET, (FLEET + ("gpus",), True)], "fleet.gpus: True is not valid under any of the given schemas"),
    ([*MINIMAL_FLEET, (FLEET + ("gpus",), 0)], "fleet.gpus: 0 is not valid under any of the given schemas"),
    ([*MINIMAL_FLEET, (FLEET + ("gpus",), [])], "fleet.gpus: [] should be non-empty"),
    ([*MINIMAL_FLEET, (FLEET + ("gpus",), [-1])], "fleet.gpus[0]: -1 is less than the minimum of 0"),
    ([*MINIMAL_FLEET, (FLEET + ("gpus",), [0, 0])], "fleet.gpus: [0, 0] has non-unique elements"),
    ([*MINIMAL_FLEET, (FLEET + ("gpus",), [1.0])], "fleet.gpus[0]: 1.0 is not of type 'integer'"),
    ([*MINIMAL_FLEET, (FLEET + ("replicas",), 0)], "fleet.replicas: 0 is less than the minimum of 1"),
    ([*MINIMAL_FLEET, (FLEET + ("replicas",), 65)], "fleet.replicas: 65 is greater than the maximum of 64"),
    ([*MINIMAL_FLEET, (FLEET + ("base_port",), 0)], "fleet.base_port: 0 is less than the minimum of 1"),
    ([*MINIMAL_FLEET, (FLEET + ("base_port",), 70000)], "fleet.base_port: 70000 is greater than the maximum of 65532"),
    ([*MINIMAL_FLEET, (FLEET + ("log_max_bytes",), 100)], "fleet.log_max_bytes: 100 is less than the minimum of 4096"),
    ([*MINIMAL_FLEET, (FLEET + ("log_backups",), -1)], "fleet.log_backups: -1 is less than the minimum of 0"),
    ([*MINIMAL_FLEET, (FLEET + ("ready_timeout_s",), 0)],
     "fleet.ready_timeout_s: 0 is less than or equal to the minimum of 0"),
    ([*MINIMAL_FLEET, (FLEET + ("stop_grace_s",), float("nan"))], "fleet.stop_grace_s: must be a finite number"),
    ([*MINIMAL_FLEET, (FLEET + ("restart", "initial_s"), 0)],
     "fleet.restart.initial_s: 0 is less than or equal to the minimum of 0"),
    ([*MINIMAL_FLEET, (FLEET + ("restart", "initial_s"), 10), (FLEET + ("restart", "max_s"), 5)],
     "fleet.restart.max_s: must be at least initial_s (10)"),
    # the fleet's backend flags: a list of strings, none the fleet sets itself, all known to the backend
    ([*MINIMAL_FLEET, (FLEET + ("flags",), "--enable_model_warmup")],
     "fleet.flags: '--enable_model_warmup' is not of type 'array'"),
    ([*MINIMAL_FLEET, (FLEET + ("flags",), [""])], "fleet.flags[0]: '' should be non-empty"),
    ([*MINIMAL_FLEET, (FLEET + ("flags",), ["--port=1"])],
     "fleet.flags: --port is set by the fleet for each worker; remove it"),
    ([*MINIMAL_FLEET, (FLEET + ("flags",), ["--model_config_file=x"])],
     "fleet.flags: --model_config_file is set by the fleet for each worker; remove it"),
    ([*MINIMAL_FLEET, (FLEET + ("flags",), ["--grace_period_s=5", "--rest_api_port", "1"])],
     "fleet.flags: --rest_api_port is set by the fleet for each worker; remove it"),
    ([*MINIMAL_FLEET, (FLEET + ("flags",), ["-enable_batching"])],
     "fleet.flags: --enable_batching is set by the fleet for each worker; remove it"),
    ([*MINIMAL_FLEET, (FLEET + ("flags",), ["--tensorflow_intra_op_parallelism=4"])],
     "fleet.flags: --tensorflow_intra_op_parallelism is set by the fleet for each worker; remove it"),
    ([*MINIMAL_FLEET, (FLEET + ("flags",), ["--no_such_flag=1"])],
     "fleet.flags: unknown flag --no_such_flag (run with --help for the list)"),
    ([*MINIMAL_FLEET, (FLEET + ("flags",), ["--rest_api_num_threads=4"])],
     ("fleet.flags: --rest_api_num_threads is a TensorFlow Serving flag that tfgate's backend does not support yet")),
    ([*MINIMAL_FLEET, (FLEET + ("flags",), ["--file_system_poll_wait_seconds=soon"])],
     ("fleet.flags: bad value for --file_system_poll_wait_seconds: invalid literal for int() with base 10: 'soon'")),
    ([*MINIMAL_FLEET, (FLEET + ("flags",), ["file_system_poll_wait_seconds=5"])],
     ("fleet.flags: unexpected argument 'file_system_poll_wait_seconds=5': every argument is a --flag")),
])
def test_invalid(edits: list[tuple[tuple[str | int, ...], Any]], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(doc_with(*edits))
    assert str(info.value) == message
    assert message.startswith(info.value.key + ": ")


@pytest.mark.parametrize(("address", "message"), [
    ("127.0.0.1", "expected host:port (e.g. 127.0.0.1:8501 or [::1]:8501), got '127.0.0.1'"),
    (":8601", "expected host:port (e.g. 127.0.0.1:8501 or [::1]:8501), got ':8601'"),
    ("localhost:", "expected host:port (e.g. 127.0.0.1:8501 or [::1]:8501), got 'localhost:'"),
    ("localhost:http", "expected host:port (e.g. 127.0.0.1:8501 or [::1]:8501), got 'localhost:http'"),
    ("127.0.0.1:08601", "expected host:port (e.g. 127.0.0.1:8501 or [::1]:8501), got '127.0.0.1:08601'"),
    ("127.0.0.1:-1", "expected host:port (e.g. 127.0.0.1:8501 or [::1]:8501), got '127.0.0.1:-1'"),
    ("::1:8601", "an IPv6 address needs brackets: [::1]:8601"),
    ("[backend]:8601", "'backend' in brackets is not an IPv6 address"),
    ("[::1:8601", "an IPv6 address needs brackets: [[::1]:8601"),
    ("999.0.0.1:8601", "'999.0.0.1' is not an IPv4 address"),
    ("back end:8601", "'back end' is not a host name or IP address"),
    ("http://backend:8601", "expected host:port, without a scheme or path, got 'http://backend:8601'"),
    ("backend:8601/v1", "expected host:port, without a scheme or path, got 'backend:8601/v1'"),
    ("127.0.0.1:0", "port 0 is out of range 1..65535"),
    ("127.0.0.1:65536", "port 65536 is out of range 1..65535"),
])
@pytest.mark.parametrize("where", ["rest", "grpc"])
def test_bad_backend_address(address: str, message: str, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(doc_with((CPU + ("backends", 1, where), address)))
    assert str(info.value) == f"pools.cpu.backends[1].{where}: {message}"


def test_listen_ports_may_be_zero_but_not_too_large() -> None:
    assert parse(doc_with((("listen", "https"), "127.0.0.1:0"), (("listen", "admin"), "127.0.0.1:0"))).listen == \
        Listen(HostPort("127.0.0.1", 0), HostPort("127.0.0.1", 0))
    with pytest.raises(ConfigError, match=r"^listen\.https: port 70000 is out of range 0\.\.65535$"):
        parse(doc_with((("listen", "https"), "0.0.0.0:70000")))


@pytest.mark.parametrize(("text", "message"), [
    ("", "the config is empty; it needs at least tls, pools and routes"),
    ("# nothing but a comment\n", "the config is empty; it needs at least tls, pools and routes"),
    ("- tls\n- pools\n", "the config must be a mapping of keys, not a list"),
    ("gateway\n", "the config must be a mapping of keys, not a str"),
    ("tls: {cert: c, key: k}\npools:\n  cpu:\n    balancer: [round_robin\n",
     "invalid YAML at line 5, column 1: expected ',' or ']', but got '<stream end>'"),
    ("tls: {cert: c, key: k}\nlisten:\n  https: 0.0.0.0:8443\n   admin: 127.0.0.1:9901\n",
     "invalid YAML at line 4, column 9: mapping values are not allowed here"),
    ("tls: {cert: c, key: k}\npools:\n  cpu: {backends: [{rest: '127.0.0.1:1'}]}\n  cpu: {backends: []}\n",
     "invalid YAML at line 4, column 3: duplicate key 'cpu'"),
    ("tls: {cert: c, key: k}\nroutes: [{model: '*', pool: cpu}]\npools: {8601: {backends: [{rest: 'h:1'}]}}\n",
     "pools: names here are non-empty strings, not 8601"),
    ("tls: {cert: c, key: k}\n1: one\n" + POOLS_AND_ROUTES,
     ("1: unknown key; known keys: listen, tls, limits, pools, routes, auth, rate_limits, expose_upstream_header, "
      "workers, fleet")),
    ("tls: {cert: c, key: k, cert: d}\n", "invalid YAML at line 1, column 24: duplicate key 'cert'"),
    ("tls: {cert: c}\n\x00\n", "invalid YAML at line 2, column 1: special characters are not allowed ('\\x00')"),
    ("tls: \t{cert: c}\x00\n", "invalid YAML at line 1, column 16: special characters are not allowed ('\\x00')"),
])
def test_bad_documents(text: str, message: str) -> None:
    assert error_of(text) == message


def test_relative_paths_follow_the_working_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    config = parse_config(yaml.safe_dump(doc_with((("tls", "client_ca"), "../ca.pem"))))
    assert config.tls == TlsConfig(cert=tmp_path / "server.pem", key=tmp_path / "server-key.pem",
                                   client_ca=tmp_path / "../ca.pem")
    assert config.tls.cert.is_absolute() and config.tls.key.is_absolute()


def test_load_config_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(BASE))
    config = load_config(path)
    assert config.source == str(path)
    assert config.routes == DEFAULTS.routes


def test_load_config_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value) == f"cannot read config file {missing}: No such file or directory"
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_load_config_directory_and_bad_encoding(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"^cannot read config file {tmp_path}: Is a directory$"):
        load_config(tmp_path)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"tls: {cert: caf\xe9}\n")
    with pytest.raises(ConfigError, match=r"^cannot read config file .*latin1\.yaml: 'utf-8' codec can't decode"):
        load_config(latin1)


def test_config_is_immutable() -> None:
    config = parse(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.expose_upstream_header = True  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.pools["cpu"].retries.attempts = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listen.https.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.pools["gpu"] = config.pools["cpu"]  # type: ignore[index]
    assert isinstance(config.routes, tuple) and isinstance(config.pools["cpu"].backends, tuple)
    assert isinstance(config.routes[0].split, tuple)


def test_built_in_code_the_pools_are_read_only_too() -> None:
    pools = {"cpu": DEFAULTS.pools["cpu"]}
    config = GatewayConfig(tls=DEFAULTS.tls, pools=pools, routes=list(DEFAULTS.routes))  # type: ignore[arg-type]
    pools.clear()
    assert list(config.pools) == ["cpu"] and config.routes == DEFAULTS.routes
    with pytest.raises(TypeError):
        config.pools["cpu"] = DEFAULTS.pools["cpu"]  # type: ignore[index]


def test_redacted_is_json_in_the_file_shape_and_parses_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(EXAMPLE)
    data = json.loads(json.dumps(redacted(config)))
    assert data["listen"] == {"https": "0.0.0.0:8443", "admin": "127.0.0.1:9901", "grpc": "0.0.0.0:8500"}
    assert data["tls"]["key"] == str(tmp_path / "certs/server-key.pem")
    assert data["pools"]["cpu"]["backends"][0] == {"rest": "127.0.0.1:8601", "grpc": "127.0.0.1:8600"}
    assert data["routes"][0]["split"][1] == {"weight": 10, "version": None, "label": "canary"}
    assert data["source"] == str(EXAMPLE)
    del data["source"]
    assert parse_config(yaml.safe_dump(data), source=str(EXAMPLE)) == config


def test_redacted_ipv6_and_defaults() -> None:
    config = parse(doc_with((("listen", "https"), "[::]:8443"), (CPU + ("backends",), [{"rest": "[::1]:8601"}])))
    data = redacted(config)
    assert data["listen"]["https"] == "[::]:8443"
    assert data["pools"]["cpu"]["backends"] == [{"rest": "[::1]:8601", "grpc": None}]
    assert data["tls"]["client_ca"] is None
    del data["source"]
    assert parse(data) == config


# ---- the fleet ----------------------------------------------------------------------------------------------------


def test_fleet_defaults() -> None:
    assert parse(BASE).fleet is None
    config = parse(doc_with(*MINIMAL_FLEET))
    assert config.fleet == FleetConfig(pool="cpu", model_config_file=BASE_DIR / "models.config",
                                       log_dir=BASE_DIR / "logs")
    assert config.pools == DEFAULTS.pools  # the fleet's pool keeps its own backends too
    fleet = config.fleet
    assert (fleet.gpus, fleet.replicas, fleet.batching_parameters_file, fleet.base_port, fleet.flags) == \
        ("auto", None, None, 8700, ())
    assert (fleet.log_dir, fleet.log_max_bytes, fleet.log_backups) == (BASE_DIR / "logs", 10 * 1024 * 1024, 3)
    assert (fleet.ready_timeout_s, fleet.stop_grace_s) == (300, 30)
    assert fleet.restart == RestartConfig(initial_s=1, max_s=60, crash_loop_restarts=5, crash_loop_window_s=120,
                                          healthy_after_s=60)


def test_fleet_every_key_set_and_relative_paths_follow_base_dir() -> None:
    config = parse(doc_with((FLEET, {
        "pool": "cpu", "model_config_file": "models/models.config", "gpus": [0, 2], "replicas": 3,
        "batching_parameters_file": "batching.config", "base_port": 9000,
        "flags": ["--file_system_poll_wait_seconds=5", "--enable_model_warmup=false"],
        "log_dir": "../logs", "log_max_bytes": 1048576, "log_backups": 7, "ready_timeout_s": 120.5, "stop_grace_s": 5,
        "restart": {"initial_s": 0.5, "max_s": 30, "crash_loop_restarts": 3, "crash_loop_window_s": 60,
                    "healthy_after_s": 10}})))
    assert config.fleet == FleetConfig(
        pool="cpu", model_config_file=BASE_DIR / "models/models.config", gpus=(0, 2), replicas=3,
        batching_parameters_file=BASE_DIR / "batching.config", base_port=9000,
        flags=("--file_system_poll_wait_seconds=5", "--enable_model_warmup=false"), log_dir=BASE_DIR / "../logs",
        log_max_bytes=1048576, log_backups=7, ready_timeout_s=120.5, stop_grace_s=5,
        restart=RestartConfig(initial_s=0.5, max_s=30, crash_loop_restarts=3, crash_loop_window_s=60,
                              healthy_after_s=10))
    assert isinstance(config.fleet.gpus, tuple) and isinstance(config.fleet.flags, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.fleet.restart.max_s = 1  # type: ignore[misc]


def example_with_fleet_uncommented(*, optional_keys_too: bool) -> str:
    """The example config with its commented-out `fleet:` block uncommented, as a reader would do; keys the block
    leaves commented out a second time (`#   # replicas: 4`) are uncommented too when `optional_keys_too`."""
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    start = lines.index("# fleet:")
    end = next((index for index in range(start, len(lines)) if not lines[index].startswith("# ")), len(lines))

    def uncomment(line: str) -> str:
        return "  " + line[6:] if optional_keys_too and line.startswith("#   # ") else line[2:]

    return "\n".join([*lines[:start], *map(uncomment, lines[start:end]), *lines[end:]]) + "\n"


def test_example_fleet_section_is_valid_once_uncommented(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(EXAMPLE).fleet is None
    # The documented values are the defaults, but for the ports (clear of the example's own backends) and the flags.
    documented = FleetConfig(pool="cpu", model_config_file=tmp_path / "models.config", base_port=8700,
                             flags=("--file_system_poll_wait_seconds=5",), log_dir=tmp_path / "logs")
    assert parse_config(example_with_fleet_uncommented(optional_keys_too=False)).fleet == documented
    assert parse_config(example_with_fleet_uncommented(optional_keys_too=True)).fleet == dataclasses.replace(
        documented, replicas=4, batching_parameters_file=tmp_path / "batching.config")


def test_redacted_fleet_is_json_and_parses_back() -> None:
    config = parse(doc_with(*MINIMAL_FLEET, (CPU + ("backends",), DELETE), (FLEET + ("gpus",), [0, 2]),
                            (FLEET + ("batching_parameters_file",), "batching.config"),
                            (FLEET + ("flags",), ["--file_system_poll_wait_seconds=5"])))
    data = orjson.loads(orjson.dumps(redacted(config)))
    assert data["fleet"] == {
        "pool": "cpu", "model_config_file": str(BASE_DIR / "models.config"), "gpus": [0, 2], "replicas": None,
        "batching_parameters_file": str(BASE_DIR / "batching.config"), "base_port": 8700,
        "flags": ["--file_system_poll_wait_seconds=5"], "log_dir": str(BASE_DIR / "logs"),
        "log_max_bytes": 10485760, "log_backups": 3, "ready_timeout_s": 300, "stop_grace_s": 30,
        "restart": {"initial_s": 1, "max_s": 60, "crash_loop_restarts": 5, "crash_loop_window_s": 120,
                    "healthy_after_s": 60}}
    assert data["pools"]["cpu"]["backends"] == []
    del data["source"]
    assert parse(data) == config
    assert orjson.loads(orjson.dumps(redacted(parse(BASE))))["fleet"] is None


# ---- auth and rate limits ------------------------------------------------------------------------------------------

DIGEST = "a" * 64


def test_auth_is_required_by_default_with_no_credentials() -> None:
    config = parse(BASE)
    assert config.auth.required and not config.auth.api_keys and config.auth.jwt is None
    assert config.rate_limits.default is None and dict(config.rate_limits.models) == {}


def test_auth_and_rate_limits_parse_into_typed_values() -> None:
    config = parse(doc_with(
        (("tls", "client_ca"), "ca.pem"), (("tls", "client_cert"), "optional"),
        (("auth",), {
            "api_keys": [{"name": "demo", "sha256": DIGEST, "models": ["half_*"], "methods": ["predict"],
                          "rate": {"per_second": 100, "burst": 200},
                          "model_rates": {"half_plus_two": {"per_second": 5, "burst": 5}}}],
            "jwt": {"issuer": "https://issuer.example", "audience": "tfgate", "jwks_file": "jwks.json"},
            "client_certs": [{"subject": "CN=batch-job", "models": ["half_plus_two"]}],
            "admin_keys": [{"name": "ops", "sha256": DIGEST}]}),
        (("rate_limits",), {"default": {"per_second": 50, "burst": 100},
                            "models": {"half_plus_two": {"per_second": 1000, "burst": 2000}}})))
    key = config.auth.api_keys[0]
    assert (key.name, key.models, key.methods, key.rate) == ("demo", ("half_*",), ("predict",), Rate(100, 200))
    assert dict(key.model_rates) == {"half_plus_two": Rate(5, 5)}
    assert config.auth.jwt is not None and config.auth.jwt.jwks_file == BASE_DIR / "jwks.json"
    assert config.auth.jwt.algorithms == ("RS256", "ES256")
    assert config.auth.client_certs[0].methods == ALL_METHODS
    assert config.rate_limits.default == Rate(50, 100)
    assert redacted(config)["auth"]["api_keys"][0]["sha256"] == "<redacted>"
    assert redacted(config)["auth"]["admin_keys"][0]["sha256"] == "<redacted>"


@pytest.mark.parametrize(("edits", "message"), [
    ([(("auth", "api_keys"), [{"name": "k", "sha256": "not-hex"}])], "auth.api_keys[0].sha256: 'not-hex' does not"),
    ([(("auth", "api_keys"), [{"name": "k", "sha256": DIGEST}, {"name": "k", "sha256": DIGEST}])],
     "auth.api_keys[1].name: the name 'k' is used twice"),
    ([(("auth", "api_keys"), [{"name": "k", "sha256": DIGEST, "methods": ["delete"]}])],
     "auth.api_keys[0].methods[0]: 'delete' is not one of"),
    ([(("auth", "jwt"), {"issuer": "i", "audience": "a", "jwks_file": "j", "algorithms": ["none"]})],
     "auth.jwt.algorithms[0]: 'none' is not one of"),
    ([(("auth", "jwt"), {"issuer": "i", "audience": "a", "jwks_file": "j", "algorithms": ["HS256"]})],
     "auth.jwt.algorithms[0]: 'HS256' is not one of"),
    ([(("auth", "client_certs"), [{"subject": "CN=x"}])],
     "auth.client_certs: client certificate rules need tls.client_cert optional or required"),
    ([(("rate_limits", "default"), {"per_second": 0, "burst": 1})], "rate_limits.default.per_second: 0 is less"),
    ([(("pools", "gpu"), {"backends": [{"rest": "127.0.0.1:8611"}]})],
     "pools.gpu.backends[0].rest: 127.0.0.1:8611 is already a backend of pool 'cpu'"),
    ([(("pools", "cpu", "health_check", "path"), "/v2/health/ready now")], "pools.cpu.health_check.path: "),
    ([(("rate_limits", "models"), {"m": {"per_second": 1}})], "rate_limits.models.m.burst: required key is missing"),
])
def test_bad_auth_and_rate_limits(edits: list[tuple[tuple[str | int, ...], Any]], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(doc_with(*edits))
    assert str(caught.value).startswith(message), str(caught.value)


def test_local_ports_are_what_the_fleet_must_leave_alone() -> None:
    """Listeners on loopback or every address, and pool backends on loopback; other hosts' ports are theirs."""
    config = parse(doc_with(
        (("listen",), {"https": "0.0.0.0:8443", "admin": "127.0.0.1:9901", "grpc": "10.0.0.5:8500"}),
        (("pools", "cpu", "backends"), [{"rest": "127.0.0.1:8701", "grpc": "localhost:8700"},
                                        {"rest": "10.0.0.6:8703", "grpc": "[::1]:8702"}])))
    assert local_ports(config) == {8443, 9901, 8701, 8700, 8702}
