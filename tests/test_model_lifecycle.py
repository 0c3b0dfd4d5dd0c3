"""Model lifecycle through a real backend subprocess: hot swap under load, config reload, load failures,
readiness, warm-up, timeouts and shutdown."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

import aiohttp
import pytest

from tests.conftest import Backend, copy_versions, write_model_config

StartBackend = Callable[..., Backend]


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def publish_version(source: Path, base: Path, version: str) -> None:
    """Copy a version in beside the base path, then rename it in: the way to publish a version atomically."""
    staging = base.parent / f".staging-{version}"
    shutil.copytree(source, staging)
    os.rename(staging, base / version)


def states(backend: Backend, model: str) -> dict[str, str]:
    response = backend.get(f"/v1/models/{model}")
    if response.status_code != 200:
        return {}
    return {entry["version"]: entry["state"] for entry in response.json()["model_version_status"]}


async def _load_until(url: str, stop: asyncio.Event, clients: int) -> tuple[int, list[str], set[float]]:
    """Closed-loop predict traffic from several keep-alive clients until told to stop."""
    failures: list[str] = []
    seen: set[float] = set()
    sent = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while not stop.is_set():
            async with session.post(url, json={"instances": [1.0]}) as response:
                sent += 1
                if response.status != 200:
                    failures.append(f"{response.status} {await response.text()}")
                else:
                    seen.add((await response.json())["predictions"][0])

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return sent, failures, seen


def test_hot_swap_under_load_fails_no_request(start_backend: StartBackend, demo_models: Path,
                                              tmp_path: Path) -> None:
    base = copy_versions(demo_models, "half_plus_two", tmp_path / "models" / "hpt", ["1"])
    backend = start_backend("--model_name=hpt", f"--model_base_path={base}", "--file_system_poll_wait_seconds=1")

    async def scenario() -> tuple[int, list[str], set[float]]:
        stop = asyncio.Event()
        traffic = asyncio.create_task(_load_until(f"{backend.url}/v1/models/hpt:predict", stop, clients=4))
        await asyncio.sleep(1.0)
        await asyncio.to_thread(publish_version, demo_models / "half_plus_two" / "2", base, "2")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and await asyncio.to_thread(states, backend, "hpt") != {
                "2": "AVAILABLE", "1": "END"}:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # keep the load on after the old version is gone
        stop.set()
        return await traffic

    sent, failures, seen = asyncio.run(scenario())
    assert failures == []
    assert seen == {2.5, 3.5}, "both versions served during the run"
    assert sent > 50
    assert states(backend, "hpt") == {"2": "AVAILABLE", "1": "END"}


def test_config_file_reload_adds_removes_and_relabels(start_backend: StartBackend, demo_models: Path,
                                                      tmp_path: Path) -> None:
    config = tmp_path / "models.config"
    hpt = f'name: "hpt" base_path: "{demo_models}/half_plus_two" model_version_policy {{ all {{}} }}'
    write_model_config(config, [hpt + ' version_labels { key: "stable" value: 1 }'])
    backend = start_backend(f"--model_config_file={config}", "--model_config_file_poll_wait_seconds=1")
    assert backend.post("/v1/models/hpt/labels/stable:predict", {"instances": [1.0]}).json() == {"predictions": [2.5]}

    write_model_config(config, [hpt + ' version_labels { key: "stable" value: 2 }',
                                f'name: "strings" base_path: "{demo_models}/strings"'])
    wait_for(lambda: backend.post("/v1/models/strings:predict", {"instances": ["ab"]}).status_code == 200,
             what="the added model")
    wait_for(lambda: backend.post("/v1/models/hpt/labels/stable:predict",
                                  {"instances": [1.0]}).json() == {"predictions": [3.5]}, what="the moved label")

    config.write_text("model_config_list { config { this is not a config } }")
    time.sleep(2.5)
    assert "not applied, keeping the current one" in backend.log()
    assert backend.post("/v1/models/strings:predict", {"instances": ["ab"]}).status_code == 200

    write_model_config(config, [hpt])
    wait_for(lambda: backend.post("/v1/models/strings:predict", {"instances": ["ab"]}).status_code == 404,
             what="the removed model")
    assert backend.post("/v1/models/hpt/versions/1:predict", {"instances": [1.0]}).status_code == 200


def test_policy_change_in_config(start_backend: StartBackend, demo_models: Path, tmp_path: Path) -> None:
    config = tmp_path / "models.config"
    write_model_config(config, [f'name: "hpt" base_path: "{demo_models}/half_plus_two"'])
    backend = start_backend(f"--model_config_file={config}", "--model_config_file_poll_wait_seconds=1")
    assert states(backend, "hpt") == {"2": "AVAILABLE"}
    write_model_config(config, [f'name: "hpt" base_path: "{demo_models}/half_plus_two" '
                                "model_version_policy { specific { versions: 1 } }"])
    wait_for(lambda: states(backend, "hpt") == {"2": "END", "1": "AVAILABLE"}, what="the specific policy")
    assert backend.post("/v1/models/hpt:predict", {"instances": [1.0]}).json() == {"predictions": [2.5]}


def test_a_version_that_fails_to_load_never_takes_down_the_serving_one(start_backend: StartBackend,
                                                                      demo_models: Path, tmp_path: Path) -> None:
    base = copy_versions(demo_models, "half_plus_two", tmp_path / "hpt", ["1"])
    backend = start_backend("--model_name=hpt", f"--model_base_path={base}", "--file_system_poll_wait_seconds=1",
                            "--max_num_load_retries=1", "--load_retry_interval_micros=100000")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    os.rename(broken, base / "3")
    wait_for(lambda: states(backend, "hpt").get("3") == "END", what="the broken version to end")
    status = backend.get("/v1/models/hpt/versions/3").json()["model_version_status"][0]["status"]
    assert status["error_code"] != "OK" and "saved_model.pb" in status["error_message"]
    assert backend.log().count("loading hpt version 3 from") == 2  # one try and one retry
    assert states(backend, "hpt")["1"] == "AVAILABLE"
    assert backend.post("/v1/models/hpt:predict", {"instances": [1.0]}).json() == {"predictions": [2.5]}


def test_start_fails_clearly_when_a_version_cannot_load(start_backend: StartBackend, tmp_path: Path) -> None:
    (tmp_path / "bad" / "1").mkdir(parents=True)
    (tmp_path / "bad" / "1" / "saved_model.pb").write_bytes(b"garbage")
    backend = start_backend("--model_name=bad", f"--model_base_path={tmp_path / 'bad'}",
                            "--max_num_load_retries=0", wait=False)
    assert backend.process.wait(timeout=60) == 1
    assert "Failed to load initial models: bad version 1" in backend.log()
    assert "Traceback" not in backend.log()


def test_start_fails_clearly_on_a_bad_config_file(start_backend: StartBackend, tmp_path: Path) -> None:
    config = tmp_path / "models.config"
    config.write_text("model_config_list { config { name: 'a' } }")
    backend = start_backend(f"--model_config_file={config}", wait=False)
    assert backend.process.wait(timeout=60) == 1
    assert "has no base_path" in backend.log()


def test_port_opens_only_once_the_model_is_loaded(start_backend: StartBackend, demo_models: Path,
                                                  tmp_path: Path) -> None:
    base = tmp_path / "later"
    base.mkdir()
    backend = start_backend("--model_name=later", f"--model_base_path={base}", "--file_system_poll_wait_seconds=1",
                            wait=False)
    wait_for(lambda: "waiting for models with no version loaded yet: later" in backend.log(), 60, "the wait")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", backend.rest_port), timeout=1).close()
    publish_version(demo_models / "half_plus_two" / "1", base, "1")
    backend.wait_ready()
    assert backend.post("/v1/models/later:predict", {"instances": [1.0]}).json() == {"predictions": [2.5]}


def test_warmup_runs_before_serving_unless_disabled(start_backend: StartBackend, demo_models: Path) -> None:
    args = ("--model_name=tf1", f"--model_base_path={demo_models}/half_plus_two_tf1")
    warmed = start_backend(*args)
    assert "warm-up of tf1 version 123: 3 records replayed" in warmed.log()
    cold = start_backend(*args, "--enable_model_warmup=false")
    assert "records replayed" not in cold.log()
    assert cold.post("/v1/models/tf1:predict", {"instances": [1.0]}).json() == {"predictions": [2.5]}


def test_rest_timeout_is_504(start_backend: StartBackend, demo_models: Path) -> None:
    backend = start_backend("--model_name=mlp", f"--model_base_path={demo_models}/mlp", "--rest_api_timeout_in_ms=1")
    response = backend.post("/v1/models/mlp:predict", {"instances": [[0.5] * 784] * 256})
    assert response.status_code == 504
    assert "timed out" in response.json()["error"]


def test_sigterm_exits_cleanly(start_backend: StartBackend, demo_models: Path) -> None:
    backend = start_backend("--model_name=hpt", f"--model_base_path={demo_models}/half_plus_two")
    assert backend.post("/v1/models/hpt:predict", {"instances": [1.0]}).status_code == 200
    assert backend.stop() == 0
    assert "shutting down" in backend.log()
