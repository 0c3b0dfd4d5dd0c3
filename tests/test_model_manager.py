"""The model manager with a fake loader (the real interface: a callable returning a Servable), a fake sleep and
real directories: swap ordering, retries, labels, removal. No TensorFlow runs here."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import MappingProxyType
from typing import Iterator

import pytest

from backend import errors
from backend.model_config import ModelConfig, ModelConfigError
from backend.models import LoadPolicy, ModelManager, VersionState
from backend.servable import Servable
from backend.version_policy import VersionPolicy


class FakeLoader:
    """Loads any version directory instantly, except versions told to fail or to wait for a gate."""

    def __init__(self) -> None:
        self.failing: set[int] = set()
        self.gates: dict[int, threading.Event] = {}
        self.calls: list[int] = []
        self.paths: dict[int, Path] = {}

    def __call__(self, name: str, version: int, path: Path) -> Servable:
        self.calls.append(version)
        self.paths[version] = path
        if version in self.gates:
            assert self.gates[version].wait(10)
        if version in self.failing:
            raise errors.Internal(f"cannot load {path}")
        return Servable(name=name, version=version, signature_defs=MappingProxyType({}),
                        signatures=MappingProxyType({}))


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


def make_versions(base: Path, *versions: int) -> Path:
    for version in versions:
        (base / str(version)).mkdir(parents=True, exist_ok=True)
    return base


def manager_with(loader: FakeLoader, executor: ThreadPoolExecutor, sleeps: list[float],
                 **policy: object) -> ModelManager:
    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
    return ModelManager(loader, executor, LoadPolicy(**policy), sleep=fake_sleep)  # type: ignore[arg-type]


async def test_latest_version_served_and_swapped_after_the_new_one_loads(tmp_path: Path,
                                                                        executor: ThreadPoolExecutor) -> None:
    loader = FakeLoader()
    manager = manager_with(loader, executor, [])
    base = make_versions(tmp_path / "m", 1, 2)
    await manager.apply((ModelConfig("m", base),))
    assert manager.resolve("m").version == 2 and manager.is_ready()
    with pytest.raises(errors.NotFound, match=r"Specific\(m, 1\)"):
        manager.resolve("m", 1)

    make_versions(base, 3)
    loader.gates[3] = threading.Event()
    sync = asyncio.create_task(manager.sync())
    while 3 not in loader.calls:
        await asyncio.sleep(0.01)
    # While 3 loads, 2 still serves, and status shows 3 LOADING.
    assert manager.resolve("m").version == 2
    assert [s.state for s in manager.status("m")][:2] == [VersionState.LOADING, VersionState.AVAILABLE]
    loader.gates[3].set()
    await sync
    assert manager.resolve("m").version == 3
    assert [(s.version, s.state) for s in manager.status("m")] == [
        (3, VersionState.AVAILABLE), (2, VersionState.END)]


async def test_versions_are_read_from_their_own_directories_and_odd_names_are_not_versions(
        tmp_path: Path, executor: ThreadPoolExecutor, caplog: pytest.LogCaptureFixture) -> None:
    """As TF Serving reads a base path: 0007/ is version 7 (and is loaded from 0007/, not 7/), names that are not
    int64 numbers are skipped, and of two names for one version the last sorted is read, with one warning."""
    base = tmp_path / "m"
    for name in ("1", "0007", "08", "8", "99999999999999999999", "\u00b2", "abc", "-3"):
        (base / name).mkdir(parents=True)
    (base / "12").write_text("a file, not a version")
    loader = FakeLoader()
    manager = manager_with(loader, executor, [])
    await manager.apply((ModelConfig("m", base, VersionPolicy("all")),))
    assert loader.paths == {1: base / "1", 7: base / "0007", 8: base / "8"}
    assert manager.resolve("m").version == 8
    await manager.sync()
    clashes = [record.getMessage() for record in caplog.records if "both version" in record.getMessage()]
    assert clashes == ["model m: directories 8 and 08 are both version 8; 8 is read, as TF Serving does"]


async def test_failed_version_is_retried_then_ends_without_taking_down_the_serving_one(
        tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    loader, sleeps = FakeLoader(), []
    manager = manager_with(loader, executor, sleeps, max_load_retries=2, load_retry_interval_s=0.5)
    base = make_versions(tmp_path / "m", 1)
    await manager.apply((ModelConfig("m", base),))
    make_versions(base, 2)
    loader.failing.add(2)
    await manager.sync()
    assert loader.calls.count(2) == 3 and sleeps == [0.5, 0.5]
    assert manager.resolve("m").version == 1
    (failed, serving) = manager.status("m")
    assert (failed.version, failed.state, failed.error.code.name) == (2, VersionState.END, "INTERNAL")
    assert (serving.version, serving.state) == (1, VersionState.AVAILABLE)
    await manager.sync()  # not retried again while it stays wanted
    assert loader.calls.count(2) == 3
    assert manager.load_failures() == "m version 2: cannot load " + str(base / "2")
    assert manager.load_failures(only_unserved=True) == ""


async def test_labels_resolve_and_a_bad_label_keeps_the_old_ones(tmp_path: Path,
                                                                  executor: ThreadPoolExecutor) -> None:
    manager = manager_with(FakeLoader(), executor, [])
    base = make_versions(tmp_path / "m", 1, 2)
    every = VersionPolicy("all")
    await manager.apply((ModelConfig("m", base, every, MappingProxyType({"stable": 1})),), strict_labels=True)
    assert manager.resolve("m", label="stable").version == 1
    with pytest.raises(errors.InvalidArgument, match="Unrecognized servable version label: canary"):
        manager.resolve("m", label="canary")
    await manager.apply((ModelConfig("m", base, every, MappingProxyType({"stable": 9})),))
    assert manager.resolve("m", label="stable").version == 1
    with pytest.raises(ModelConfigError, match="not currently available"):
        await manager.apply((ModelConfig("m", base, every, MappingProxyType({"stable": 9})),), strict_labels=True)


async def test_labels_may_point_at_unavailable_versions_when_allowed(tmp_path: Path,
                                                                      executor: ThreadPoolExecutor) -> None:
    manager = manager_with(FakeLoader(), executor, [], allow_labels_for_unavailable=True)
    base = make_versions(tmp_path / "m", 1)
    await manager.apply((ModelConfig("m", base, labels=MappingProxyType({"next": 2})),), strict_labels=True)
    with pytest.raises(errors.NotFound):
        manager.resolve("m", label="next")


async def test_models_added_and_removed_by_config(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    manager = manager_with(FakeLoader(), executor, [])
    a, b = make_versions(tmp_path / "a", 1), make_versions(tmp_path / "b", 4)
    await manager.apply((ModelConfig("a", a),))
    await manager.apply((ModelConfig("b", b),))
    assert manager.model_names() == ["b"] and manager.resolve("b").version == 4
    with pytest.raises(errors.NotFound, match=r"Latest\(a\)"):
        manager.resolve("a")
    with pytest.raises(errors.NotFound, match="Could not find any versions of model a"):
        manager.status("a")


async def test_policy_change_loads_and_unloads(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    manager = manager_with(FakeLoader(), executor, [])
    base = make_versions(tmp_path / "m", 1, 2, 3)
    await manager.apply((ModelConfig("m", base, VersionPolicy("latest", 2)),))
    assert {s.version for s in manager.status("m") if s.state is VersionState.AVAILABLE} == {2, 3}
    await manager.apply((ModelConfig("m", base, VersionPolicy("specific", versions=frozenset({1}))),))
    assert {s.version for s in manager.status("m") if s.state is VersionState.AVAILABLE} == {1}


async def test_model_without_versions_is_not_ready(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    manager = manager_with(FakeLoader(), executor, [])
    base = tmp_path / "empty"
    await manager.apply((ModelConfig("m", base),))
    assert not manager.is_ready()
    make_versions(base, 5)
    await manager.sync()
    assert manager.is_ready() and manager.version_ready("m", 5)
