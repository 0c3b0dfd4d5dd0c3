"""The fleet's port leases: which holds a lease keeps (with fake holds), and what a hold does on this kernel (with
real loopback sockets): it keeps other programs out, yet lets the backend bind and listen as it does."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Iterator

import pytest

from gateway.fleet_plan import port_pair
from gateway.fleet_ports import FleetPorts, hold_port

HOST = "127.0.0.1"
BASE = 9000


class FakeHold:
    def __init__(self, port: int) -> None:
        self.port = port
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeHost:
    """Ports another program has (`busy`); every hold handed out, to see which the fleet kept."""

    def __init__(self, *busy: int) -> None:
        self.busy = set(busy)
        self.holds: list[FakeHold] = []

    def bind(self, host: str, port: int) -> FakeHold | None:
        assert host == HOST
        if port in self.busy:
            return None
        self.holds.append(FakeHold(port))
        return self.holds[-1]

    def open(self) -> set[int]:
        return {hold.port for hold in self.holds if not hold.closed}


def test_a_lease_holds_its_pair_until_released() -> None:
    host = FakeHost()
    ports = FleetPorts(HOST, host.bind)
    lease, choice = ports.lease(BASE, 0, 2)
    assert (choice.pair, lease.ports) == (0, port_pair(BASE, 0)) and host.open() == {BASE, BASE + 1}
    assert ports.in_use() == {BASE, BASE + 1}
    lease.release()
    lease.release()  # idempotent
    assert host.open() == set() and ports.in_use() == set()


def test_a_pair_passed_over_is_let_go_and_the_chosen_one_kept() -> None:
    host = FakeHost(BASE + 1)  # another program has worker 0's REST port
    ports = FleetPorts(HOST, host.bind)
    lease, choice = ports.lease(BASE, 0, 2)
    assert choice.pair == 2 and choice.skipped == ((BASE + 1,),)  # pair 1 is worker 1's own
    assert host.open() == set(port_pair(BASE, 2))  # the gRPC port of pair 0 was held while probing, then let go
    assert len(lease.holds) == 2


def test_leased_ports_are_no_other_process_s_until_released() -> None:
    """A replacement, and a process whose predecessor is still stopping, never share a port."""
    ports = FleetPorts(HOST, FakeHost().bind)
    old, _ = ports.lease(BASE, 0, 2)
    sibling, _ = ports.lease(BASE, 1, 2)
    replacement, choice = ports.lease(BASE, 0, 2)  # the old process still serves (or still stops)
    assert choice.pair == 2
    old.release()
    again, choice = ports.lease(BASE, 1, 2)  # the sibling's replacement: its own pair is in use, worker 0's owned
    assert choice.pair == 3
    assert len({port for lease in (sibling, replacement, again) for port in lease.ports}) == 6


def test_a_pair_taken_after_every_probe_failed_keeps_what_it_could_hold() -> None:
    host = FakeHost(*range(BASE, BASE + 2 * 9, 2))  # every gRPC port of the first 9 pairs is busy
    lease, choice = FleetPorts(HOST, host.bind).lease(BASE, 0, 1)
    assert choice.pair == 8 and len(choice.skipped) == 8
    assert host.open() == {port_pair(BASE, 8)[1]} and len(lease.holds) == 1  # its busy gRPC port is not held


def test_close_releases_every_lease() -> None:
    host = FakeHost()
    ports = FleetPorts(HOST, host.bind)
    for index in range(3):
        ports.lease(BASE, index, 3)
    ports.close()
    assert host.open() == set() and ports.in_use() == set()


# ---- real sockets (Linux: elsewhere a hold is only a check) ---------------------------------------------------------

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="holds are Linux's SO_REUSEADDR")


@pytest.fixture
def held() -> Iterator[tuple[int, socket.socket]]:
    for _ in range(20):
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            port = probe.getsockname()[1]
        hold = hold_port(HOST, port)
        if hold is not None:
            break
    else:
        pytest.fail("no free port to hold")
    assert isinstance(hold, socket.socket)
    with hold:
        yield port, hold


@linux_only
def test_a_held_port_is_refused_to_other_programs(held: tuple[int, socket.socket]) -> None:
    port, _ = held
    with socket.socket() as other, pytest.raises(OSError):
        other.bind((HOST, port))


@linux_only
async def test_the_backend_binds_and_serves_on_a_held_port(held: tuple[int, socket.socket]) -> None:
    """As the backend's REST server does (asyncio, SO_REUSEADDR); gRPC's C core sets SO_REUSEADDR the same way."""
    port, _ = held
    server = await asyncio.start_server(lambda reader, writer: writer.close(), HOST, port, reuse_address=True)
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
        assert await reader.read() == b""  # accepted, then closed by the server
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


def test_a_port_another_program_listens_on_cannot_be_held() -> None:
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen()
        assert hold_port(HOST, listener.getsockname()[1]) is None


@linux_only
def test_a_released_port_is_free_again(held: tuple[int, socket.socket]) -> None:
    port, hold = held
    hold.close()
    with socket.socket() as other:
        other.bind((HOST, port))
