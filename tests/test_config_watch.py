"""The config file watcher (gateway.reloading.watch_config) on a real file system, as deployments lay configs out:
a plain file edited in place or replaced by rename, a symlink to a file kept elsewhere, and a Kubernetes ConfigMap
volume (gateway.yaml -> ..data/gateway.yaml, ..data -> a timestamped directory that an update swaps atomically and
whose old copy is then deleted)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.config_watch import watch_config

SETTLE_S = 0.5  # the watcher is up and has skipped the set-up's own events
WAIT_S = 10.0


class Reloads:
    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.changed = asyncio.Event()

    async def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        self.changed.set()

    async def next(self) -> None:
        await asyncio.wait_for(self.changed.wait(), WAIT_S)
        self.changed.clear()


@contextlib.asynccontextmanager
async def watching(path: Path) -> AsyncIterator[Reloads]:
    reloads = Reloads()
    task = asyncio.create_task(watch_config(path, reloads))
    await asyncio.sleep(SETTLE_S)
    try:
        yield reloads
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def config_map(volume: Path, generation: int, text: str) -> None:
    """What the kubelet does on each update: a new timestamped directory, ..data swapped to it by rename, the old
    directory deleted; gateway.yaml itself is a symlink through ..data, made once."""
    directory = volume / f"..2026_11_29_{generation}"
    directory.mkdir()
    (directory / "gateway.yaml").write_text(text)
    (volume / "..data_tmp").symlink_to(directory.name)
    old = (volume / "..data").resolve() if (volume / "..data").exists() else None
    os.replace(volume / "..data_tmp", volume / "..data")
    if old is not None:
        shutil.rmtree(old)
    if not (volume / "gateway.yaml").is_symlink():
        (volume / "gateway.yaml").symlink_to("..data/gateway.yaml")


async def test_an_edit_in_place_and_a_replacement_by_rename_reload(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("a: 1\n")
    async with watching(path) as reloads:
        path.write_text("a: 2\n")
        await reloads.next()
        (tmp_path / ".gateway.yaml.swp").write_text("a: 3\n")
        os.replace(tmp_path / ".gateway.yaml.swp", path)  # as editors save
        await reloads.next()


async def test_a_neighbour_file_changing_does_not_reload(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("a: 1\n")
    async with watching(path) as reloads:
        for line in range(20):
            with (tmp_path / "access.log").open("a") as log:
                log.write(f"line {line}\n")
            await asyncio.sleep(0.02)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reloads.changed.wait(), 1.0)


@pytest.mark.parametrize("updates", [1, 3])
async def test_a_config_map_update_reloads(tmp_path: Path, updates: int) -> None:
    config_map(tmp_path, 0, "a: 0\n")
    async with watching(tmp_path / "gateway.yaml") as reloads:
        for generation in range(1, updates + 1):
            config_map(tmp_path, generation, f"a: {generation}\n")
            await reloads.next()
    assert len(reloads.reasons) == updates


async def test_a_symlinked_config_reloads_when_its_target_is_edited(tmp_path: Path) -> None:
    (tmp_path / "kept").mkdir()
    (tmp_path / "mounted").mkdir()
    target = tmp_path / "kept" / "gw.yaml"
    target.write_text("a: 1\n")
    path = tmp_path / "mounted" / "gateway.yaml"
    path.symlink_to(target)
    async with watching(path) as reloads:
        target.write_text("a: 2\n")
        await reloads.next()
        replacement = tmp_path / "kept" / "other.yaml"
        replacement.write_text("a: 3\n")
        path.unlink()
        path.symlink_to(replacement)  # the link itself now points elsewhere
        await reloads.next()
        replacement.write_text("a: 4\n")  # ...and that new target is watched from then on
        await reloads.next()
