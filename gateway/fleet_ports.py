"""The loopback ports the fleet owns: each process's pair is held by the supervisor from the moment it is chosen until
the process is gone, so nothing else on the host can take a port while the backend loads its models.

Why: a backend binds its ports only once its models are loaded, seconds after its pair was chosen (tens of seconds
on a loaded machine). A port that was free at the choice could be taken in between: by a listener on port 0, or,
since base_port may lie in the system's ephemeral range (Linux: 32768-60999 by default), by the local end of any
outgoing connection, this gateway's own health checks and readiness probes included. The backend then failed its
bind and exited, and the fleet counted a crash: a worker that did not start, or a rolling change whose replacement
failed (and a restart).

How: a hold is a socket bound to host:port with SO_REUSEADDR that never listens. Linux then refuses the port to
bind() without SO_REUSEADDR, to bind(0) and to connect()'s choice of a local port, yet lets the backend, which binds
with SO_REUSEADDR too (asyncio's servers and gRPC's both do), bind and listen on it. A hold is not inherited by the
process (Python's sockets are not inheritable), and is closed once the process has exited.

Limits: another program that binds the very port number with SO_REUSEADDR itself (say, a second gateway whose fleet
was given overlapping ports) is not kept out; the fleet's own plan keeps its ports clear of the rest of its config.
Linux only: BSD's SO_REUSEADDR (macOS) would keep the backend out too, so elsewhere a hold is only a check that the
port is free now, and the port can still be taken before the backend binds it.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from gateway.fleet_plan import PairChoice, choose_pair, port_pair


class Hold(Protocol):
    def close(self) -> None: ...


class _Checked:
    """A port found free and let go at once (not Linux: see the module docstring)."""

    def close(self) -> None:
        pass


@dataclass(eq=False)
class PortLease:
    """The ports of one process, and the holds on those of them the fleet could take."""

    grpc: int
    rest: int
    holds: list[Hold] = field(default_factory=list)
    _ledger: set[PortLease] | None = field(default=None, repr=False)  # the fleet's leases, left on release

    @property
    def ports(self) -> tuple[int, int]:
        return self.grpc, self.rest

    def release(self) -> None:
        """Let the ports go (the process has exited, or never started); idempotent."""
        for hold in self.holds:
            hold.close()
        self.holds.clear()
        if self._ledger is not None:
            self._ledger.discard(self)
            self._ledger = None


class FleetPorts:
    """Every lease of one fleet: a port leased to a process (starting, serving or stopping) is no other's."""

    def __init__(self, host: str, bind: Callable[[str, int], Hold | None] | None = None) -> None:
        self._host = host
        self._bind = bind or hold_port
        self._leases: set[PortLease] = set()

    def in_use(self) -> set[int]:
        """The ports leased to a process of the fleet, held or not."""
        return {port for lease in self._leases for port in lease.ports}

    def lease(self, base_port: int, index: int, workers: int) -> tuple[PortLease, PairChoice]:
        """The pair worker `index` of `workers` starts on (see choose_pair), leased at once: the availability check is
        the hold itself, so no other program can take a port between the choice and the process's bind. A pair
        taken anyway after every probe failed (see choose_pair) is leased with the holds the fleet could get."""
        tried: dict[int, Hold | None] = {}  # None: another program has it

        def take(port: int) -> bool:
            if port not in tried:
                tried[port] = self._bind(self._host, port)
            return tried[port] is not None

        choice = choose_pair(base_port, index, workers, self.in_use(), take)
        grpc_port, rest_port = port_pair(base_port, choice.pair)
        lease = PortLease(grpc_port, rest_port, _ledger=self._leases)
        for port in lease.ports:
            take(port)  # a pair taken after every probe failed was not asked about
        for port, hold in tried.items():
            if hold is not None and port in lease.ports:
                lease.holds.append(hold)
            elif hold is not None:  # a port of a pair passed over
                hold.close()
        self._leases.add(lease)
        return lease, choice

    def close(self) -> None:
        """Release every lease (the fleet has stopped)."""
        for lease in list(self._leases):
            lease.release()


def hold_port(host: str, port: int) -> Hold | None:
    """A hold on host:port (see the module docstring), or None when another program has the port: a listener, a
    connection's local end, or a socket bound without SO_REUSEADDR. Answers as the backend's own bind would."""
    hold = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hold.bind((host, port))
    except OSError:
        hold.close()
        return None
    if not sys.platform.startswith("linux"):
        hold.close()
        return _Checked()
    return hold


def reserve_shared_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) with SO_REUSEPORT, for a group of worker processes that listen on one port with it: port 0
    resolves once, another program that holds the port fails the start at once, and the port stays the group's while
    a worker restarts (connections go to the workers that listen; with none, they are refused)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
