"""Token-bucket slots in a memory-mapped file that several gateway processes share, under one cross-process lock.

The gateway's primary process `create`s the file; each worker `open`s it by path (unrelated processes: nothing is
inherited). This module only stores numbers; the bucket math and the eviction policy are `gateway.ratelimit`'s.

Layout (little-endian): a 64-byte header, then `capacity` slots of 48 bytes.
- header: magic, version, slot size, capacity, a random hash key, then the live slot count and a use counter;
- slot: key hash (0 = empty), last use (the use counter when last touched: a strict LRU order across processes,
  where clock readings can tie), tokens, stamp (seconds, the caller's clock), per_second, burst.
Keys are hashed to 64 bits (blake2b keyed with the file's random key, so clients cannot aim keys at one probe run);
the top 2 bits carry a caller's tag (1-3), which also keeps every live hash non-zero. Open addressing with linear
probing, kept at most 3/4 full (`max_buckets`: the caller evicts before that). One deletion shifts the rest of its
probe run back (no tombstones: lookups never slow down with churn); a bulk `drop` rebuilds the table instead.

Locking: `lock` is an exclusive `fcntl.flock` on the file, which excludes other processes and other opens of the
file, and is released by the kernel if its holder dies. It is not reentrant and does not exclude threads sharing
one `SharedBuckets`: use one per thread. Every read or write of slots and header counters must hold it.

A holder killed mid-update (the kernel then releases the lock) can leave the bucket it was writing with a mix of old
and new values, a bucket lost (then recreated full) or duplicated (lookups use one copy) by an unfinished shift or
rebuild, or the live count off: `drop` recounts and keeps one copy; the table stays usable.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import secrets
import struct
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

_MAGIC = b"tfgateRL"
_VERSION = 1
_HEADER = struct.Struct("<8sIIQ16s")  # magic, version, slot size, capacity, hash key
_COUNTERS = struct.Struct("<QQ")  # live slots, use counter
_COUNTERS_AT = _HEADER.size
_HEADER_SIZE = 64
_SLOT = struct.Struct("<QQdddd")  # hash, last use, tokens, stamp, per_second, burst
_SLOT_SIZE = _SLOT.size
_U64 = struct.Struct("<Q")  # a slot's hash (offset 0) or last use (offset 8)
_STATE = struct.Struct("<dddd")  # tokens, stamp, per_second, burst: the slot after hash and last use
_TAG_SHIFT = 62
_HASH_MASK = (1 << _TAG_SHIFT) - 1
# Linear probing slows sharply past 3/4 full (a miss probes ~8.5 slots at 3/4, ~50 at 9/10): buckets kept below.
_LOAD = 0.75


class Slot(NamedTuple):
    key_hash: int
    used: int  # the use counter when last touched
    tokens: float
    stamp: float
    per_second: float
    burst: float


def by_use(slot: Slot) -> int:
    return slot.used


class _FileLock:
    """The exclusive flock as a context manager, one object per file (no allocation per use)."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *_: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


class SharedBuckets:
    """One process's mapping of the bucket file. Slot indices stay valid until a `delete` or `drop` moves slots."""

    def __init__(self, path: Path, fd: int) -> None:
        """Use `create` or `open`: this maps an already checked file."""
        self.path = path
        self._fd = fd
        self._map = mmap.mmap(fd, 0)
        _, _, _, self.capacity, self._hash_key = _HEADER.unpack_from(self._map, 0)
        self.max_buckets = max(int(self.capacity * _LOAD), 1)
        self.lock = _FileLock(fd)

    @classmethod
    def create(cls, path: Path, capacity: int = 65536) -> SharedBuckets:
        """A new zeroed file (mode 0600) replacing any at `path` atomically: openers see the old file or the new."""
        if capacity < 2:
            raise ValueError(f"bucket file capacity must be at least 2 slots, got {capacity}")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, _HEADER_SIZE + capacity * _SLOT_SIZE)
            os.pwrite(fd, _HEADER.pack(_MAGIC, _VERSION, _SLOT_SIZE, capacity, secrets.token_bytes(16)), 0)
            os.replace(tmp, path)
            return cls(path, fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def open(cls, path: Path) -> SharedBuckets:
        """Map an existing file; anything but a bucket file of this version is refused with a ValueError."""
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            header = os.pread(fd, _HEADER.size, 0)
            if len(header) < _HEADER.size or not header.startswith(_MAGIC):
                raise ValueError(f"{path} is not a tfgate rate-limit bucket file (bad magic)")
            _, version, slot_size, capacity, _ = _HEADER.unpack(header)
            if (version, slot_size) != (_VERSION, _SLOT_SIZE):
                raise ValueError(f"{path}: rate-limit bucket file version {version} (slot size {slot_size}), "
                                 f"expected version {_VERSION} (slot size {_SLOT_SIZE})")
            if capacity < 2 or size != _HEADER_SIZE + capacity * _SLOT_SIZE:
                raise ValueError(f"{path}: rate-limit bucket file is {size} bytes, not the {capacity} slots "
                                 "its header says (truncated or damaged)")
            return cls(path, fd)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def key_hash(self, tag: int, *parts: str) -> int:
        """The 64-bit key of `parts`, `tag` (1-3) in its top 2 bits. Length prefixes keep the encoding unambiguous."""
        data = "".join(f"{len(part)}:{part}" for part in parts).encode("utf-8", "surrogatepass")
        digest = int.from_bytes(hashlib.blake2b(data, digest_size=8, key=self._hash_key).digest(), "little")
        return (tag << _TAG_SHIFT) | (digest & _HASH_MASK)

    @staticmethod
    def tag(key_hash: int) -> int:
        return key_hash >> _TAG_SHIFT

    # --- under the lock ----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Live slots."""
        return int(_COUNTERS.unpack_from(self._map, _COUNTERS_AT)[0])

    def find(self, key_hash: int) -> int:
        """The slot index holding `key_hash`, or -1."""
        index = self._probe(key_hash)
        return index if _U64.unpack_from(self._map, _HEADER_SIZE + index * _SLOT_SIZE)[0] == key_hash else -1

    def insert(self, key_hash: int, tokens: float, stamp: float, per_second: float, burst: float) -> int:
        """A new slot for a `key_hash` that `find` did not find; it counts as just used."""
        index = self._probe(key_hash)
        at = _HEADER_SIZE + index * _SLOT_SIZE
        if _U64.unpack_from(self._map, at)[0] != 0:
            raise RuntimeError(f"{self.path}: no free slot for a new bucket (the table is full or damaged)")
        count, used = _COUNTERS.unpack_from(self._map, _COUNTERS_AT)
        _COUNTERS.pack_into(self._map, _COUNTERS_AT, count + 1, used + 1)
        _SLOT.pack_into(self._map, at, key_hash, used + 1, tokens, stamp, per_second, burst)
        return index

    def use(self, index: int) -> tuple[float, float, float, float]:
        """Mark the slot most recently used; its tokens, stamp, per_second, burst."""
        count, used = _COUNTERS.unpack_from(self._map, _COUNTERS_AT)
        _COUNTERS.pack_into(self._map, _COUNTERS_AT, count, used + 1)
        at = _HEADER_SIZE + index * _SLOT_SIZE
        _U64.pack_into(self._map, at + 8, used + 1)
        tokens, stamp, per_second, burst = _STATE.unpack_from(self._map, at + 16)
        return tokens, stamp, per_second, burst

    def write(self, index: int, tokens: float, stamp: float, per_second: float, burst: float) -> None:
        _STATE.pack_into(self._map, _HEADER_SIZE + index * _SLOT_SIZE + 16, tokens, stamp, per_second, burst)

    def delete(self, index: int) -> None:
        """Empty the slot, then shift back the entries after it that probed past it (Knuth's algorithm R)."""
        mapped, capacity = self._map, self.capacity
        empty = bytes(_SLOT_SIZE)
        hole = probe = index
        mapped[_HEADER_SIZE + hole * _SLOT_SIZE:_HEADER_SIZE + (hole + 1) * _SLOT_SIZE] = empty
        while True:  # ends: the hole is empty, so at worst the walk comes round to it
            probe = (probe + 1) % capacity
            start = _HEADER_SIZE + probe * _SLOT_SIZE
            key_hash = _U64.unpack_from(mapped, start)[0]
            if key_hash == 0:
                break
            home = key_hash % capacity
            # it moves into the hole unless its home lies cyclically in (hole, probe]: found from there as it is
            stays = hole < home <= probe if hole < probe else (home > hole or home <= probe)
            if not stays:
                mapped[_HEADER_SIZE + hole * _SLOT_SIZE:_HEADER_SIZE + (hole + 1) * _SLOT_SIZE] = (
                    mapped[start:start + _SLOT_SIZE])
                mapped[start:start + _SLOT_SIZE] = empty
                hole = probe
        count, used = _COUNTERS.unpack_from(mapped, _COUNTERS_AT)
        _COUNTERS.pack_into(mapped, _COUNTERS_AT, max(count - 1, 0), used)

    def slots(self) -> list[Slot]:
        """A copy of the live slots."""
        return [Slot._make(slot) for slot in _SLOT.iter_unpack(self._map[_HEADER_SIZE:]) if slot[0] != 0]

    def sample(self, start: int, count: int) -> list[Slot]:
        """Up to `count` live slots, the first found walking from slot `start` (wrapping): fewer only when the whole
        table holds fewer. Eviction looks at these instead of every slot, so its work does not grow with the table."""
        mapped, capacity = self._map, self.capacity
        found: list[Slot] = []
        for step in range(capacity):
            at = _HEADER_SIZE + (start + step) % capacity * _SLOT_SIZE
            if _U64.unpack_from(mapped, at)[0] != 0:
                found.append(Slot._make(_SLOT.unpack_from(mapped, at)))
                if len(found) == count:
                    break
        return found

    def drop(self, disposable: Callable[[Slot], bool], keep: int | None = None) -> None:
        """Delete the slots `disposable` picks, then, with `keep`, the least recently used down to `keep` slots.
        The table is rebuilt from the slots kept: one pass over the file rather than a shift per deletion."""
        live = sorted(self.slots(), key=by_use)
        left: dict[int, Slot] = {}
        for slot in live:  # a hash twice (a crash mid-shift): the copy used last is the one lookups found
            if not disposable(slot):
                left[slot.key_hash] = slot
        kept = list(left.values())[-keep:] if keep is not None and len(left) > keep else list(left.values())
        _, used = _COUNTERS.unpack_from(self._map, _COUNTERS_AT)
        _COUNTERS.pack_into(self._map, _COUNTERS_AT, len(kept), used)  # counted, not updated: heals a drifted count
        if len(kept) == len(live):
            return  # nothing to drop (a reload that removed no cap)
        capacity = self.capacity
        taken = [False] * capacity
        table = bytearray(capacity * _SLOT_SIZE)
        for slot in kept:
            index = slot.key_hash % capacity
            while taken[index]:
                index = (index + 1) % capacity
            taken[index] = True
            _SLOT.pack_into(table, index * _SLOT_SIZE, *slot)
        self._map[_HEADER_SIZE:] = table

    def _probe(self, key_hash: int) -> int:
        """The slot holding `key_hash`, else the empty slot ending its probe run (else, table full, its home)."""
        mapped, capacity = self._map, self.capacity
        index = home = key_hash % capacity
        while True:
            found = _U64.unpack_from(mapped, _HEADER_SIZE + index * _SLOT_SIZE)[0]
            if found == key_hash or found == 0:
                return index
            index = (index + 1) % capacity
            if index == home:
                return index
