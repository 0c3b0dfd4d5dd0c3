"""The gateway's YAML config, read into one frozen tree of typed values. The only module that reads YAML.

How it works: PyYAML's safe loader (refusing duplicate keys, which it would otherwise let the last one win) gives
plain data; a Draft 2020-12 JSON Schema checks shapes, types, ranges and unknown keys (`additionalProperties: false`
everywhere); then the rules a schema cannot say well (addresses, references between routes and pools, one route per
model, exactly one of version/label in a split) are checked while the frozen dataclasses are built.

Guarantees: a config either comes back whole or raises one `ConfigError` whose message starts with the dotted key
path (`routes[1].split[0].weight: ...`). A key whose value is null counts as absent, so `client_ca: ~` or a section
whose lines are all commented out takes the defaults (unquoted `none`, as in `client_cert: none`, is the string
"none" in YAML, not null). Relative paths resolve against the current working directory, as nginx and Envoy do;
certificate files are not opened here (the gateway reports its own TLS errors). Nothing is read at import time.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, cast

import jsonschema
import yaml
from jsonschema.exceptions import ValidationError, best_match

from gateway.config_fleet import FLEET_SCHEMA, FleetConfig, build_fleet
from gateway.config_schema import DURATION, PERCENT, STRING, THRESHOLD, ConfigError, schema_object

BalancerKind = Literal["round_robin", "least_latency"]
ClientCertMode = Literal["none", "optional", "required"]


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str  # an IPv6 address without its brackets
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Listen:
    https: HostPort = HostPort("0.0.0.0", 8443)
    admin: HostPort = HostPort("127.0.0.1", 9901)  # loopback: the admin API reloads config and shows state
    grpc: HostPort | None = None  # TF Serving's gRPC API over the same TLS; off unless given


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: Path
    key: Path
    client_ca: Path | None = None
    client_cert: ClientCertMode = "none"


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 16 * 1024 * 1024
    header_timeout_s: float = 10
    request_timeout_s: float = 30
    idle_timeout_s: float = 75


@dataclass(frozen=True, slots=True)
class HealthCheck:
    interval_s: float = 2
    timeout_s: float = 1
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1
    path: str = "/v2/health/ready"
    jitter_percent: float = 10


_MAX_EJECTION_S = 300


@dataclass(frozen=True, slots=True)
class Outlier:
    consecutive_failures: int = 5
    ejection_s: float = 30
    max_ejection_s: float = _MAX_EJECTION_S  # absent from the file: max(300, ejection_s), as Envoy's max_ejection_time
    max_ejected_percent: float = 50


@dataclass(frozen=True, slots=True)
class Retries:
    attempts: int = 2  # tries per request, the first one included: 1 never retries
    budget_percent: float = 20
    min_retries_per_s: float = 3


@dataclass(frozen=True, slots=True)
class Backend:
    rest: HostPort  # the backend's identity: health state and connection pools are keyed by str(rest)
    grpc: HostPort | None = None


@dataclass(frozen=True, slots=True)
class Pool:
    name: str
    backends: tuple[Backend, ...]
    balancer: BalancerKind = "least_latency"
    health_check: HealthCheck = HealthCheck()
    outlier: Outlier = Outlier()
    retries: Retries = Retries()
    panic_threshold_percent: float = 50
    # least_latency: how fast a latency peak is forgotten (the EWMA's time constant). Measured with one backend
    # 20 ms slower (bench degraded-backend): at 10 s (linkerd's default) or 2 s, latency spikes of the healthy
    # backend on a busy machine kept it looking slow and 3-7% of requests went to the slow one; at 0.5 s, 0.3-0.6%.
    # The slow one is re-probed about every decay x ln(its latency / the other's cost): a request or two a second.
    latency_decay_s: float = 0.5


@dataclass(frozen=True, slots=True)
class SplitTarget:
    weight: int
    version: int | None = None  # exactly one of version / label is set
    label: str | None = None


@dataclass(frozen=True, slots=True)
class Route:
    model: str  # "*" matches any model without a route of its own
    pool: str
    split: tuple[SplitTarget, ...] = ()


ALL_METHODS = ("predict", "classify", "regress", "metadata", "status")
# JWT signature algorithms verified with a public key. HMAC ("HS*") and "none" are absent on purpose: with a JWKS of
# public keys, HS256 would let anyone holding the public key forge tokens.
JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES256K", "ES384", "ES512", "EdDSA")
_EMPTY_RATES: Mapping[str, Rate] = types.MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Rate:
    per_second: float
    burst: float  # the bucket's size: requests a principal may send at once after being idle


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    sha256: str  # hex digest of the key: the key itself is never stored
    models: tuple[str, ...] = ("*",)  # fnmatch globs
    methods: tuple[str, ...] = ALL_METHODS
    rate: Rate | None = None  # for this principal, across its models
    model_rates: Mapping[str, Rate] = field(default_factory=lambda: _EMPTY_RATES)  # this principal, one model


@dataclass(frozen=True, slots=True)
class ClientCertRule:
    subject: str  # RFC 4514, as the certificate's subject prints it: "CN=batch-job"
    models: tuple[str, ...] = ("*",)
    methods: tuple[str, ...] = ALL_METHODS
    rate: Rate | None = None
    model_rates: Mapping[str, Rate] = field(default_factory=lambda: _EMPTY_RATES)


@dataclass(frozen=True, slots=True)
class JwtConfig:
    issuer: str
    audience: str
    jwks_file: Path
    models_claim: str = "models"
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway_s: float = 30
    rate: Rate | None = None  # per token subject


@dataclass(frozen=True, slots=True)
class AdminKey:
    name: str
    sha256: str


@dataclass(frozen=True, slots=True)
class AuthConfig:
    required: bool = True  # off only when said so: a gateway with no credentials refuses every request
    api_keys: tuple[ApiKey, ...] = ()
    jwt: JwtConfig | None = None
    client_certs: tuple[ClientCertRule, ...] = ()
    admin_keys: tuple[AdminKey, ...] = ()


@dataclass(frozen=True, slots=True)
class RateLimits:
    default: Rate | None = None  # per principal whose entry names no rate
    models: Mapping[str, Rate] = field(default_factory=lambda: _EMPTY_RATES)  # a model's cap, all principals


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    tls: TlsConfig
    pools: Mapping[str, Pool]
    routes: tuple[Route, ...]
    listen: Listen = Listen()
    limits: Limits = Limits()
    auth: AuthConfig = AuthConfig()
    rate_limits: RateLimits = RateLimits()
    expose_upstream_header: bool = False
    fleet: FleetConfig | None = None  # backends the gateway starts and supervises itself (gateway/fleet.py)
    workers: int | Literal["auto"] = "auto"  # gateway processes on the same port; auto: one per core
    source: str = "<text>"

    def __post_init__(self) -> None:
        # Read-only even when built in code, so a snapshot shared by every request cannot be changed under it.
        object.__setattr__(self, "pools", types.MappingProxyType(dict(self.pools)))
        object.__setattr__(self, "routes", tuple(self.routes))


def parse_config(text: str, source: str = "<text>", base_dir: Path | None = None) -> GatewayConfig:
    """Parse and check a YAML config; relative paths resolve against `base_dir`, by default the working directory."""
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"invalid YAML{where}: {exc.problem or exc.context}") from exc
    except yaml.reader.ReaderError as exc:  # a character YAML forbids, such as NUL: reported by offset only
        line, column = text.count("\n", 0, exc.position) + 1, exc.position - text.rfind("\n", 0, exc.position)
        raise ConfigError(f"invalid YAML at line {line}, column {column}: {exc.reason} "
                          f"({chr(exc.character)!r})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}") from exc
    except RecursionError:  # PyYAML builds nested collections recursively: ~500 levels of [[[...]]] exhaust the stack
        raise ConfigError("invalid YAML: collections nested too deeply") from None
    except ValueError as exc:  # a scalar its constructor refuses: a date such as 2024-13-45, an int of 5,000 digits
        raise ConfigError(f"invalid YAML: {exc}") from None
    if doc is None:
        raise ConfigError("the config is empty; it needs at least tls, pools and routes")
    if not isinstance(doc, dict):
        raise ConfigError(f"the config must be a mapping of keys, not a {type(doc).__name__}")
    doc = _drop_nulls(doc, _SCHEMA, [])
    error = best_match(_Validator(_SCHEMA).iter_errors(doc))
    if error is not None:
        raise _schema_error(error)
    return _build(doc, source, base_dir if base_dir is not None else Path.cwd())


def load_config(path: Path) -> GatewayConfig:
    """Read and parse a config file; a file that cannot be read is a ConfigError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    return parse_config(text, source=str(path))


def worker_document(path: Path, *, https: HostPort, grpc: HostPort | None,
                    backends: Mapping[str, tuple[Backend, ...]], admin_key: AdminKey) -> str:
    """The config file of one gateway worker (gateway/primary.py), from the operator's file as it is now: one
    process (`workers: 1`) on the https (and gRPC) port the primary resolved, its admin API on a free loopback port, no fleet
    (the primary runs it), the fleet's ready members added to their pool's backends, and the primary's own admin
    key, with which it reloads the worker and reads its state. Everything else is the operator's, unchanged."""
    doc = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    doc["workers"] = 1
    doc.pop("fleet", None)
    doc["listen"] = {**(doc.get("listen") or {}), "https": str(https), "admin": "127.0.0.1:0",
                     **({"grpc": str(grpc)} if grpc is not None else {})}
    for pool, extra in backends.items():
        pool_doc = doc["pools"][pool] = doc["pools"][pool] or {}
        pool_doc["backends"] = [*(pool_doc.get("backends") or []),
                                *({"rest": str(b.rest), **({"grpc": str(b.grpc)} if b.grpc else {})} for b in extra)]
    auth = doc["auth"] = doc.get("auth") or {}
    auth["admin_keys"] = [*(auth.get("admin_keys") or []), {"name": admin_key.name, "sha256": admin_key.sha256}]
    return yaml.safe_dump(doc, sort_keys=False)


def redacted(config: GatewayConfig) -> dict[str, Any]:
    """The config as JSON-able data, in the file's shape, for GET /admin/config. Keys are stored as digests only,
    and even those are shown as "<redacted>": a digest of a short key can be brute-forced."""
    out = cast(dict[str, Any], _jsonable(config))
    for pool in out["pools"].values():
        del pool["name"]  # it is the key already
    for entry in [*out["auth"]["api_keys"], *out["auth"]["admin_keys"]]:
        entry["sha256"] = "<redacted>"
    return out


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        if isinstance(value, HostPort):
            return str(value)
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ---- YAML and schema ---------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (two `cpu:` pools would silently become one)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


_RATE = schema_object({"per_second": DURATION, "burst": {"type": "number", "minimum": 1}},
                      required=("per_second", "burst"))
_RATES = {"type": "object", "propertyNames": {"type": "string", "minLength": 1}, "additionalProperties": _RATE}
_DIGEST = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$"}
_GRANTS = {
    "models": {"type": "array", "items": STRING},
    "methods": {"type": "array", "items": {"enum": list(ALL_METHODS)}, "uniqueItems": True},
    "rate": _RATE, "model_rates": _RATES,
}

_SCHEMA = schema_object({
    "listen": schema_object({"https": {"type": "string"}, "admin": {"type": "string"}, "grpc": {"type": "string"}}),
    "tls": schema_object({
        "cert": STRING, "key": STRING, "client_ca": STRING,
        "client_cert": {"enum": ["none", "optional", "required"]},
    }, required=("cert", "key")),
    "limits": schema_object({
        "max_body_bytes": {"type": "integer", "minimum": 1},
        "header_timeout_s": DURATION, "request_timeout_s": DURATION, "idle_timeout_s": DURATION,
    }),
    "pools": {
        "type": "object", "minProperties": 1, "propertyNames": {"type": "string", "minLength": 1},
        "additionalProperties": schema_object({
            "balancer": {"enum": ["round_robin", "least_latency"]},
            "health_check": schema_object({
                "interval_s": DURATION, "timeout_s": DURATION,
                "unhealthy_threshold": THRESHOLD, "healthy_threshold": THRESHOLD,
                "path": {"type": "string", "pattern": "^/[^\\s]*$"}, "jitter_percent": PERCENT,
            }),
            "outlier": schema_object({
                "consecutive_failures": THRESHOLD, "ejection_s": DURATION, "max_ejection_s": DURATION,
                "max_ejected_percent": PERCENT,
            }),
            "retries": schema_object({
                "attempts": {"type": "integer", "minimum": 1}, "budget_percent": PERCENT,
                "min_retries_per_s": {"type": "number", "minimum": 0},
            }),
            "panic_threshold_percent": PERCENT,
            "latency_decay_s": DURATION,
            "backends": {
                "type": "array",
                "items": schema_object({"rest": {"type": "string"}, "grpc": {"type": "string"}}, required=("rest",)),
            },
        }),
    },
    "routes": {
        "type": "array", "minItems": 1,
        "items": schema_object({
            "model": STRING, "pool": STRING,
            "split": {"type": "array", "items": schema_object({
                "weight": {"type": "integer", "minimum": 1},
                "version": {"type": "integer", "minimum": 0},
                "label": STRING,
            }, required=("weight",))},
        }, required=("model", "pool")),
    },
    "auth": schema_object({
        "required": {"type": "boolean"},
        "api_keys": {"type": "array", "items": schema_object({"name": _NAME, "sha256": _DIGEST, **_GRANTS},
                                                       required=("name", "sha256"))},
        "jwt": schema_object({
            "issuer": STRING, "audience": STRING, "jwks_file": STRING, "models_claim": STRING,
            "algorithms": {"type": "array", "minItems": 1, "uniqueItems": True,
                           "items": {"enum": list(JWT_ALGORITHMS)}},
            "leeway_s": {"type": "number", "minimum": 0, "maximum": 300}, "rate": _RATE,
        }, required=("issuer", "audience", "jwks_file")),
        "client_certs": {"type": "array",
                         "items": schema_object({"subject": STRING, **_GRANTS}, required=("subject",))},
        "admin_keys": {"type": "array", "items": schema_object({"name": _NAME, "sha256": _DIGEST},
                                                         required=("name", "sha256"))},
    }),
    "rate_limits": schema_object({"default": _RATE, "models": _RATES}),
    "expose_upstream_header": {"type": "boolean"},
    "workers": {"oneOf": [{"const": "auto"}, {"type": "integer", "minimum": 1, "maximum": 256}]},
    "fleet": FLEET_SCHEMA,
}, required=("tls", "pools", "routes"))

# JSON Schema counts 2.0 as an integer; a count or a port written as a float is a mistake worth naming.
_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)),
)


def _key_path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _drop_nulls(value: Any, schema: Mapping[str, Any], path: list[Any]) -> Any:
    """Drop known keys whose value is null (absent, so defaults apply) and refuse NaN, infinities and integers beyond
    64 bits: YAML reads any number of digits, and one too large for a float (a split weight, a burst) or for TF
    Serving's int64 versions would fail every request it applies to, not the reload.

    Unknown keys keep their nulls so the schema still reports them.
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError("must be a finite number", _key_path(path))
    if isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
        raise ConfigError("out of range: an integer here must fit in 64 bits", _key_path(path))
    if isinstance(value, dict):
        known = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {key: _drop_nulls(item, known.get(key, extra if isinstance(extra, dict) else {}), [*path, key])
                for key, item in value.items() if not (item is None and key in known)}
    if isinstance(value, list):
        return [_drop_nulls(item, schema.get("items", {}), [*path, index]) for index, item in enumerate(value)]
    return value


def _schema_error(error: ValidationError) -> ConfigError:
    path = list(error.absolute_path)
    if error.validator == "additionalProperties":
        known = list(error.schema.get("properties", {}))
        unknown = next(key for key in error.instance if key not in known)
        close = difflib.get_close_matches(str(unknown), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(known)}"
        return ConfigError(f"unknown key{hint}", _key_path([*path, str(unknown)]))
    if error.validator == "required":
        missing = next(key for key in error.validator_value if key not in error.instance)
        return ConfigError("required key is missing", _key_path([*path, missing]))
    if "propertyNames" in error.relative_schema_path:
        return ConfigError(f"names here are non-empty strings, not {error.instance!r}", _key_path(path))
    return ConfigError(error.message, _key_path(path))


# ---- building the typed tree, with the rules the schema cannot express -------------------------------------------

_PORT = re.compile(r"0|[1-9][0-9]{0,4}")
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_])?")


def _host_port(text: str, key: str, *, allow_any_port: bool = False) -> HostPort:
    """Parse "host:port" or "[v6]:port"; port 0 (any free port, for tests) only where `allow_any_port`."""
    host, sep, port = text.rpartition(":")
    if "/" in text:
        raise ConfigError(f"expected host:port, without a scheme or path, got {text!r}", key)
    if not sep or not host or not _PORT.fullmatch(port):
        raise ConfigError(f"expected host:port (e.g. 127.0.0.1:8501 or [::1]:8501), got {text!r}", key)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{host!r} in brackets is not an IPv6 address", key) from None
    elif ":" in host:
        raise ConfigError(f"an IPv6 address needs brackets: [{host}]:{port}", key)
    elif not _HOSTNAME.fullmatch(host):
        raise ConfigError(f"{host!r} is not a host name or IP address", key)
    elif re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ConfigError(f"{host!r} is not an IPv4 address", key) from None
    number = int(port)
    if not (0 if allow_any_port else 1) <= number <= 65535:
        raise ConfigError(f"port {number} is out of range {0 if allow_any_port else 1}..65535", key)
    return HostPort(host, number)


def _build(doc: dict[str, Any], source: str, base_dir: Path) -> GatewayConfig:
    listen_doc = doc.get("listen", {})
    listen = Listen(**{name: _host_port(text, f"listen.{name}", allow_any_port=True)
                       for name, text in listen_doc.items()})
    if listen.https == listen.admin and listen.https.port != 0:
        raise ConfigError(f"{listen.admin} is also listen.https", "listen.admin")
    if listen.grpc is not None and listen.grpc.port != 0 and listen.grpc in (listen.https, listen.admin):
        raise ConfigError(f"{listen.grpc} is also listen.{'https' if listen.grpc == listen.https else 'admin'}",
                          "listen.grpc")

    tls_doc = doc["tls"]
    client_ca = tls_doc.get("client_ca")
    tls = TlsConfig(cert=base_dir / tls_doc["cert"], key=base_dir / tls_doc["key"],
                    client_ca=base_dir / client_ca if client_ca is not None else None,
                    client_cert=tls_doc.get("client_cert", "none"))
    if tls.client_cert != "none" and tls.client_ca is None:
        raise ConfigError(f"client_cert {tls.client_cert!r} needs tls.client_ca to verify clients with",
                          "tls.client_cert")

    pools = {name: _pool(name, pool_doc) for name, pool_doc in doc["pools"].items()}
    _one_pool_per_backend(pools)
    fleet = build_fleet(doc["fleet"], base_dir, pools) if "fleet" in doc else None
    for name, pool in pools.items():
        if not pool.backends and (fleet is None or fleet.pool != name):
            raise ConfigError("needs at least one backend (only the fleet's pool may have none)",
                              f"pools.{name}.backends")
    auth = _auth(doc.get("auth", {}), base_dir)
    if auth.client_certs and tls.client_cert == "none":
        raise ConfigError("client certificate rules need tls.client_cert optional or required", "auth.client_certs")
    limits_doc = doc.get("rate_limits", {})
    rate_limits = RateLimits(default=_rate(limits_doc.get("default")), models=_rates(limits_doc.get("models", {})))
    return GatewayConfig(tls=tls, pools=pools, routes=_routes(doc["routes"], pools), listen=listen,
                         limits=Limits(**doc.get("limits", {})), auth=auth, rate_limits=rate_limits,
                         expose_upstream_header=doc.get("expose_upstream_header", False), fleet=fleet,
                         workers=doc.get("workers", "auto"), source=source)


def _one_pool_per_backend(pools: Mapping[str, Pool]) -> None:
    """A backend's health, latency and connections are its own: two pools cannot share it."""
    owner: dict[HostPort, str] = {}
    for name, pool in pools.items():
        for index, backend in enumerate(pool.backends):
            if backend.rest in owner:
                raise ConfigError(f"{backend.rest} is already a backend of pool {owner[backend.rest]!r}",
                                  f"pools.{name}.backends[{index}].rest")
            owner[backend.rest] = name


def _rate(doc: dict[str, float] | None) -> Rate | None:
    return None if doc is None else Rate(**doc)


def _rates(doc: Mapping[str, dict[str, float]]) -> Mapping[str, Rate]:
    return types.MappingProxyType({model: Rate(**rate) for model, rate in doc.items()})


def _grants(doc: dict[str, Any]) -> dict[str, Any]:
    return {"models": tuple(doc.get("models", ("*",))), "methods": tuple(doc.get("methods", ALL_METHODS)),
            "rate": _rate(doc.get("rate")), "model_rates": _rates(doc.get("model_rates", {}))}


def _auth(doc: dict[str, Any], base_dir: Path) -> AuthConfig:
    api_keys = tuple(ApiKey(name=entry["name"], sha256=entry["sha256"], **_grants(entry))
                     for entry in doc.get("api_keys", ()))
    admin_keys = tuple(AdminKey(name=entry["name"], sha256=entry["sha256"]) for entry in doc.get("admin_keys", ()))
    for key, entries in (("auth.api_keys", api_keys), ("auth.admin_keys", admin_keys)):
        names = [entry.name for entry in entries]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise ConfigError(f"the name {name!r} is used twice", f"{key}[{index}].name")
    jwt_doc = doc.get("jwt")
    jwt = None if jwt_doc is None else JwtConfig(
        issuer=jwt_doc["issuer"], audience=jwt_doc["audience"], jwks_file=base_dir / jwt_doc["jwks_file"],
        models_claim=jwt_doc.get("models_claim", "models"),
        algorithms=tuple(jwt_doc.get("algorithms", ("RS256", "ES256"))), leeway_s=jwt_doc.get("leeway_s", 30),
        rate=_rate(jwt_doc.get("rate")))
    client_certs = tuple(ClientCertRule(subject=entry["subject"], **_grants(entry))
                         for entry in doc.get("client_certs", ()))
    return AuthConfig(required=doc.get("required", True), api_keys=api_keys, jwt=jwt, client_certs=client_certs,
                      admin_keys=admin_keys)


def _pool(name: str, doc: dict[str, Any]) -> Pool:
    key = f"pools.{name}"
    backends: list[Backend] = []
    for index, backend_doc in enumerate(doc.get("backends", ())):
        backend_key = f"{key}.backends[{index}]"
        grpc = backend_doc.get("grpc")
        backend = Backend(rest=_host_port(backend_doc["rest"], f"{backend_key}.rest"),
                          grpc=_host_port(grpc, f"{backend_key}.grpc") if grpc is not None else None)
        for earlier_index, earlier in enumerate(backends):
            if earlier.rest == backend.rest:
                raise ConfigError(f"{backend.rest} is already {key}.backends[{earlier_index}]", f"{backend_key}.rest")
        backends.append(backend)

    outlier_doc = {"max_ejection_s": max(_MAX_EJECTION_S, doc.get("outlier", {}).get("ejection_s", 0)),
                   **doc.get("outlier", {})}
    outlier = Outlier(**outlier_doc)
    if outlier.max_ejection_s < outlier.ejection_s:
        raise ConfigError(f"must be at least ejection_s ({outlier.ejection_s})", f"{key}.outlier.max_ejection_s")
    scalars = {field: doc[field] for field in ("balancer", "panic_threshold_percent", "latency_decay_s")
               if field in doc}
    return Pool(name=name, backends=tuple(backends), health_check=HealthCheck(**doc.get("health_check", {})),
                outlier=outlier, retries=Retries(**doc.get("retries", {})), **scalars)


def _routes(docs: list[dict[str, Any]], pools: Mapping[str, Pool]) -> tuple[Route, ...]:
    routes: list[Route] = []
    first_index: dict[str, int] = {}
    for index, doc in enumerate(docs):
        key = f"routes[{index}]"
        model, pool = doc["model"], doc["pool"]
        if model in first_index:
            raise ConfigError(f"model {model!r} already has a route, routes[{first_index[model]}]", f"{key}.model")
        first_index[model] = index
        if pool not in pools:
            raise ConfigError(f"no pool named {pool!r} (pools: {', '.join(pools)})", f"{key}.pool")
        split: list[SplitTarget] = []
        for split_index, target_doc in enumerate(doc.get("split", ())):
            target_key = f"{key}.split[{split_index}]"
            target = SplitTarget(**target_doc)
            if (target.version is None) == (target.label is None):
                raise ConfigError("needs exactly one of version, label", target_key)
            if any((t.version, t.label) == (target.version, target.label) for t in split):
                what = f"version {target.version}" if target.label is None else f"label {target.label!r}"
                raise ConfigError(f"{what} is listed twice", target_key)
            split.append(target)
        routes.append(Route(model=model, pool=pool, split=tuple(split)))
    return tuple(routes)
