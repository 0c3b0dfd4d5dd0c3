"""Watching the config file for changes, as deployments lay it out.

Layouts it follows:
- a plain file, edited in place or replaced by rename (as editors save);
- a symlink to a file kept elsewhere, edited there or pointed at another file;
- a Kubernetes ConfigMap volume: gateway.yaml -> ..data/gateway.yaml, where ..data -> ..2026_11_29_..., and an
  update writes a new timestamped directory, swaps ..data to it by rename and deletes the old one. The file's own
  directory then never changes, and the directory it resolves to is deleted: a watch on either alone misses it.

How: it watches, without recursion, the directory the path is given in and the one the file resolves to (inotify
through watchfiles), and passes on only events for a name on the way from the path to the file (the path's own,
each symlink's text, the file's). After each batch it compares the file's identity (where the path resolves,
device, inode, size and modification time) with the last one seen and reloads when it differs; when the way to
the file changed, it watches anew along the new way. A busy neighbour (a log written beside the config) wakes the
watcher's thread, never the event loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NamedTuple

import watchfiles

log = logging.getLogger("tfgate.gateway")

_MAX_LINKS = 40  # as the kernel's own limit on symlinks followed in one lookup


class _Way(NamedTuple):
    """Where to watch, and which entry names there may change the config."""

    directories: frozenset[Path]
    names: frozenset[str]


async def watch_config(path: Path, reload: Callable[[str], Awaitable[object]]) -> None:
    """Call `reload("file changed")` each time the config file changes, until cancelled; an exception it raises is
    logged and the watch goes on."""
    path = Path(os.path.abspath(path))
    seen = _identity(path)
    while True:
        way = _way(path)
        async for _changes in watchfiles.awatch(*way.directories, debounce=200, step=50, recursive=False,
                                                watch_filter=_named(way.names)):
            identity = _identity(path)
            if identity is not None and identity != seen:
                seen = identity
                try:
                    await reload("file changed")
                except Exception:  # nothing awaits this task before the stop: ending it would go unseen, and
                    log.exception("config reload (file changed) failed")  # every later edit would be ignored
            if _way(path) != way:
                break  # a link now leads elsewhere (or a watched directory is gone): watch along the new way


def _named(names: frozenset[str]) -> Callable[[watchfiles.Change, str], bool]:
    return lambda _change, changed: Path(changed).name in names


def _identity(path: Path) -> tuple[str, int, int, int, int] | None:
    """Which file the path is now, and which version of it; None while it does not exist."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _way(path: Path) -> _Way:
    directories, names = {path.parent}, {path.name}
    current = path
    for _ in range(_MAX_LINKS):
        try:
            link = Path(os.readlink(current))
        except OSError:  # not a symlink (or gone): the end of the way
            break
        names.update(link.parts)
        current = current.parent / link  # an absolute link replaces the whole path
    resolved = path.resolve()
    names.add(resolved.name)
    directories.add(resolved.parent)
    return _Way(frozenset(directory.resolve() for directory in directories if directory.exists()), frozenset(names))
