"""The one object a reload swaps: a validated config with the routing table, pools and TLS context built from it.

Each request reads `Gateway.snapshot` once and uses only what it holds, so a request that started before a reload
finishes on the config it started with, and a reload is one reference assignment: never half-applied.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.auth import Authenticator
from gateway.config import GatewayConfig
from gateway.routes import RouteTable
from gateway.upstream import PoolRuntime


@dataclass(frozen=True, slots=True)
class Snapshot:
    generation: int  # 1 for the config the gateway started with, +1 per applied reload
    config: GatewayConfig
    routes: RouteTable
    pools: Mapping[str, PoolRuntime]
    tls: ssl.SSLContext
    authenticator: Authenticator  # built with the config: a reload that revokes a key applies to the next request
