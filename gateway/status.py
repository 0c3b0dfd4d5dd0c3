"""`tfgate status`: one table of every pool's backends and the fleet's workers, read from the admin API.

The admin URL and key come from the flags, else from what `tfgate up` left in `.tfgate/` (`up.json`, `admin-key`),
else `http://127.0.0.1:9901` and `$TFGATE_ADMIN_KEY`. A backend and a fleet worker are one row when the worker's
REST address is the backend's; a worker that is not in its pool (starting, restarting, given up) is a row of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from gateway.up import STATE_DIR

COLUMNS = ("POOL", "BACKEND", "STATE", "WORKER", "GPU", "PID", "RESTARTS", "EWMA_MS", "IN_FLIGHT", "REQUESTS")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin", help="the admin API's URL (default: the running `tfgate up`'s, else "
                        "http://127.0.0.1:9901)")
    parser.add_argument("--admin-key-file", type=Path, help=f"file holding an admin key (default: {STATE_DIR}/"
                        "admin-key, else $TFGATE_ADMIN_KEY)")
    parser.add_argument("--home", type=Path, default=Path("."), help="where `tfgate up` keeps .tfgate/")
    parser.add_argument("--json", action="store_true", help="print the admin API's JSON instead of a table")


def rows(document: dict[str, Any]) -> list[tuple[str, ...]]:
    """The table's rows from GET /admin/backends (pure: tested with documents)."""
    fleet = document.get("fleet") or {"pool": "", "workers": []}
    workers = {worker["rest"]: worker for worker in fleet["workers"] if worker.get("rest")}
    shown: set[int] = set()
    table: list[tuple[str, ...]] = []
    for pool, backends in document["pools"].items():
        for backend in backends:
            worker = workers.get(backend["rest"]) if pool == fleet["pool"] else None
            if worker is not None:
                shown.add(worker["worker"])
            table.append((pool, backend["rest"], backend["state"], *_worker_cells(worker),
                          f"{backend['ewma_ms']:g}", str(backend["in_flight"]), str(backend["requests"])))
    for worker in fleet["workers"]:
        if worker["worker"] not in shown:
            table.append((fleet["pool"], worker.get("rest") or "-", worker["state"], *_worker_cells(worker),
                          "-", "-", "-"))
    return table


def _worker_cells(worker: dict[str, Any] | None) -> tuple[str, str, str, str]:
    if worker is None:
        return "-", "-", "-", "-"
    gpu = worker.get("gpu")
    return (str(worker["worker"]), "cpu" if gpu is None else str(gpu["index"]),
            str(worker["pid"]) if worker.get("pid") is not None else "-", str(worker["restarts"]))


def format_table(table: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[column]) for row in [COLUMNS, *table]) for column in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [COLUMNS, *table])


def run(args: argparse.Namespace) -> int:
    state = args.home / STATE_DIR
    admin = args.admin
    if admin is None:
        up = state / "up.json"
        admin = json.loads(up.read_text())["admin"] if up.exists() else "http://127.0.0.1:9901"
    key_file = args.admin_key_file or state / "admin-key"
    key = key_file.read_text().strip() if key_file.exists() else os.environ.get("TFGATE_ADMIN_KEY", "")
    request = urllib.request.Request(f"{admin}/admin/backends", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            document = json.load(response)
    except urllib.error.HTTPError as error:
        print(f"tfgate status: {admin} answered {error.code}: {error.read().decode(errors='replace')}",
              file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as error:
        print(f"tfgate status: cannot reach the admin API at {admin} ({error}); is the gateway running?",
              file=sys.stderr)
        return 1
    print(json.dumps(document, indent=2) if args.json else format_table(rows(document)))
    return 0
