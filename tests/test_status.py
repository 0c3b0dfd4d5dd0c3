"""`tfgate status`'s table from admin documents: pool backends joined with fleet workers by REST address."""

from __future__ import annotations

from typing import Any

from gateway.status import COLUMNS, format_table, rows


def backend(rest: str, state: str = "healthy", requests: int = 7) -> dict[str, Any]:
    return {"rest": rest, "grpc": None, "state": state, "ewma_ms": 1.25, "in_flight": 0, "requests": requests,
            "failures": 0, "ejections": 0}


def worker(index: int, rest: str | None, state: str, gpu: int | None = None, pid: int | None = 100,
           restarts: int = 0) -> dict[str, Any]:
    return {"worker": index, "state": state, "rest": rest, "pid": pid, "restarts": restarts,
            "gpu": None if gpu is None else {"index": gpu, "name": "T4", "uuid": ""}}


def test_rows_join_workers_to_their_backends_and_list_the_rest() -> None:
    document = {
        "pools": {"static": [backend("10.0.0.1:8501")], "gpu": [backend("127.0.0.1:8701", requests=3)]},
        "fleet": {"pool": "gpu", "workers": [worker(0, "127.0.0.1:8701", "ready", gpu=1, pid=42),
                                             worker(1, None, "failed", gpu=2, pid=None, restarts=5)]},
    }
    assert rows(document) == [
        ("static", "10.0.0.1:8501", "healthy", "-", "-", "-", "-", "1.25", "0", "7"),
        ("gpu", "127.0.0.1:8701", "healthy", "0", "1", "42", "0", "1.25", "0", "3"),
        ("gpu", "-", "failed", "1", "2", "-", "5", "-", "-", "-"),
    ]


def test_a_worker_of_another_pool_is_not_joined_to_a_backend_with_its_address() -> None:
    document = {"pools": {"static": [backend("127.0.0.1:8701")]},
                "fleet": {"pool": "cpu", "workers": [worker(0, "127.0.0.1:8701", "starting")]}}
    assert [row[:4] for row in rows(document)] == [("static", "127.0.0.1:8701", "healthy", "-"),
                                                   ("cpu", "127.0.0.1:8701", "starting", "0")]


def test_without_a_fleet_only_backends() -> None:
    assert rows({"pools": {"cpu": [backend("127.0.0.1:8601")]}})[0][3:7] == ("-", "-", "-", "-")


def test_table_aligns_columns() -> None:
    table = format_table([("cpu", "127.0.0.1:8601", "healthy", "0", "cpu", "9", "0", "1", "0", "12345")])
    header, line = table.splitlines()
    assert header.split() == list(COLUMNS)
    assert header.index("BACKEND") == line.index("127.0.0.1:8601")
    assert line.endswith("12345")
