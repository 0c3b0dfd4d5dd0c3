"""What the gateway's end-to-end tests share besides their fixtures (tests/conftest.py: certs, backends, proxies):
the model they call, the admin key, and the config document they start gateways with."""

from __future__ import annotations

from typing import Any

from bench.delay_proxy import DelayProxy
from gateway.certs import CertPaths
from gateway.keys import digest

MODEL = "half_plus_two"
ADMIN_KEY = "tfg_test-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def config_document(certs: CertPaths, proxies: list[DelayProxy], **overrides: Any) -> dict[str, Any]:
    pool = {"balancer": "round_robin",
            "health_check": {"interval_s": 0.2, "timeout_s": 0.5, "unhealthy_threshold": 1, "healthy_threshold": 1},
            "outlier": {"consecutive_failures": 3, "ejection_s": 30, "max_ejected_percent": 50},
            "retries": {"attempts": 2, "budget_percent": 100},
            "backends": [{"rest": proxy.address} for proxy in proxies]}
    pool.update(overrides.pop("pool", {}))
    document: dict[str, Any] = {
        "listen": {"https": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "tls": {"cert": str(certs.server_cert), "key": str(certs.server_key), "client_ca": str(certs.ca_cert)},
        "limits": {"max_body_bytes": 1 << 20, "header_timeout_s": 1, "request_timeout_s": 5},
        "pools": {"cpu": pool},
        "routes": [{"model": MODEL, "pool": "cpu"}],
        # Authentication is off here (tests/test_gateway_auth_e2e.py covers it); the admin API still needs its key.
        "auth": {"required": False, "admin_keys": [{"name": "ops", "sha256": digest(ADMIN_KEY)}]},
        "expose_upstream_header": True,
    }
    document.update(overrides)
    return document



