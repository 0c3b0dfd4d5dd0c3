"""The bucket file the gateway's workers share (gateway.shared_buckets): one budget across limiters and processes,
deletion that keeps every other slot findable, and files that are not bucket files refused."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import time
import types
from collections.abc import Mapping
from pathlib import Path

import pytest

from gateway.config import Rate
from gateway.config import RateLimits as Limits
from gateway.ratelimit import Decision, RateLimiter
from gateway.shared_buckets import SharedBuckets

NO_RATES: Mapping[str, Rate] = types.MappingProxyType({})
REPO = Path(__file__).resolve().parent.parent


def test_two_limiters_on_one_file_share_a_principals_budget(tmp_path: Path) -> None:
    path = tmp_path / "buckets"
    primary, worker = SharedBuckets.create(path), SharedBuckets.open(path)
    limits = Limits(default=Rate(per_second=1, burst=10))
    one, two = RateLimiter(limits, store=primary), RateLimiter(limits, store=worker)
    # alternating between the two, as connections land on either worker: 10 in total, not 20
    assert sum(limiter.check("alice", None, NO_RATES, "m", 0.0).allowed for _ in range(10) for limiter in (one, two)) == 10
    assert one.check("alice", None, NO_RATES, "m", 0.5) == two.check("alice", None, NO_RATES, "m", 0.5)
    assert two.check("alice", None, NO_RATES, "m", 1.0) == Decision(True, 10, 0, 10, 0, "principal")
    assert one.check("alice", None, NO_RATES, "m", 1.0) == Decision(False, 10, 0, 10, 1, "principal")
    assert one.check("bob", None, NO_RATES, "m", 1.0).allowed  # another principal: its own budget
    assert len(one) == len(two) == 2
    primary.close()
    worker.close()


def test_a_worker_whose_clock_reading_lags_earns_nothing_twice(tmp_path: Path) -> None:
    """Readings taken before the lock was won arrive late: the seconds another worker already counted add nothing."""
    path = tmp_path / "buckets"
    primary, worker = SharedBuckets.create(path), SharedBuckets.open(path)
    limits = Limits(default=Rate(per_second=1, burst=5))
    one, two = RateLimiter(limits, store=primary), RateLimiter(limits, store=worker)
    assert sum(one.check("alice", None, NO_RATES, "m", 0.0).allowed for _ in range(5)) == 5
    assert sum(one.check("alice", None, NO_RATES, "m", 2.0).allowed for _ in range(5)) == 2
    assert not two.check("alice", None, NO_RATES, "m", 1.5).allowed  # read before 2.0, checked after it
    assert one.check("alice", None, NO_RATES, "m", 3.0).allowed
    assert not two.check("alice", None, NO_RATES, "m", 3.0).allowed  # one second after 2.0: one token, not 1.5
    primary.close()
    worker.close()


@pytest.mark.parametrize("seed", range(6))
def test_deletion_keeps_every_other_slot_findable(tmp_path: Path, seed: int) -> None:
    """Random inserts and deletes in a small table (long probe runs that wrap round its end) against a dict."""
    rng = random.Random(seed)
    table = SharedBuckets.create(tmp_path / "buckets", capacity=13)
    expected: dict[int, float] = {}  # key hash -> tokens
    with table.lock:
        for step in range(3000):
            if len(expected) < 11 and (not expected or rng.random() < 0.55):
                key_hash = (1 << 62) | rng.randrange(1, 60)
                if table.find(key_hash) < 0:
                    assert key_hash not in expected
                    table.insert(key_hash, float(step), 0.0, 1.0, 1.0)
                    expected[key_hash] = float(step)
            else:
                key_hash = rng.choice(list(expected))
                table.delete(table.find(key_hash))
                del expected[key_hash]
            assert {slot.key_hash: slot.tokens for slot in table.slots()} == expected
            assert len(table) == len(expected)
            assert all(table.find(key_hash) >= 0 for key_hash in expected)
        assert all(table.find((1 << 62) | n) < 0 for n in range(1, 60) if (1 << 62) | n not in expected)
    table.close()


def test_a_sample_is_the_first_live_slots_from_its_start_round_the_end(tmp_path: Path) -> None:
    table = SharedBuckets.create(tmp_path / "buckets", capacity=8)
    with table.lock:
        for home in (1, 3, 6):  # a hash lands on its home slot, hash % capacity, in an empty table
            table.insert((1 << 62) | (8 + home), float(home), 0.0, 1.0, 1.0)
        assert [slot.tokens for slot in table.sample(4, 2)] == [6.0, 1.0]  # past the end, round to the start
        assert [slot.tokens for slot in table.sample(0, 5)] == [1.0, 3.0, 6.0]  # fewer: all there are
    table.close()


WORKER = """
import json, sys, time
from pathlib import Path
from gateway.config import Rate, RateLimits
from gateway.ratelimit import RateLimiter
from gateway.shared_buckets import SharedBuckets

job = json.loads(sys.argv[1])
table = SharedBuckets.open(Path(job["path"]))
limits = RateLimits(default=Rate(*job["default"]), models={"m": Rate(*job["cap"])} if job["cap"] else {})
limiter = RateLimiter(limits, store=table)
principals = [f"p{n}" for n in range(job["principals"])] or ["alice"]
while time.monotonic() < job["start"]:
    time.sleep(0.001)
admitted = checks = 0
while (now := time.monotonic()) < job["stop"]:
    admitted += limiter.check(principals[checks % len(principals)], None, {}, "m", now).allowed
    checks += 1
table.close()
print(json.dumps([admitted, checks]))
"""


def run_workers(path: Path, workers: int, seconds: float, **job: object) -> tuple[int, int, float, float]:
    """Workers hammering check() over one real-time window: (admitted, checks, start, stop) summed over all."""
    start = time.monotonic() + 2.0  # time for every interpreter to start and import
    stop = start + seconds
    argv = json.dumps({"path": str(path), "start": start, "stop": stop, **job})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(workers)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and not err, err
        results.append(json.loads(out))
    return sum(admitted for admitted, _ in results), sum(checks for _, checks in results), start, stop


def assert_table_sound(table: SharedBuckets, start: float, stop: float, rates: set[tuple[float, float]]) -> None:
    """Every live slot findable, once; the count right; levels, stamps and rates what the limiter could write."""
    with table.lock:
        slots = list(table.slots())
        assert len(table) == len(slots) <= table.max_buckets
        assert len({slot.key_hash for slot in slots}) == len(slots)
        for slot in slots:
            assert table.find(slot.key_hash) >= 0
            assert (slot.per_second, slot.burst) in rates
            assert 0.0 <= slot.tokens <= slot.burst
            assert start <= slot.stamp < stop


def test_worker_processes_share_one_budget(tmp_path: Path) -> None:
    per_second, burst, seconds = 200.0, 50.0, 1.0
    table = SharedBuckets.create(tmp_path / "buckets")
    admitted, checks, start, stop = run_workers(table.path, 4, seconds, default=[per_second, burst], cap=None,
                                                principals=0)
    assert admitted <= burst + per_second * seconds + 1  # all together; 4 x that if each kept its own
    assert admitted >= (burst + per_second * seconds) / 2  # offered far more: most of the budget is used
    assert checks > admitted
    assert_table_sound(table, start, stop, {(per_second, burst)})
    assert len(table) == 1
    table.close()


def test_worker_processes_evicting_from_a_small_table(tmp_path: Path) -> None:
    """Many principals through a 64-slot table: evictions in every process while the model cap holds for all."""
    cap_per_second, cap_burst, seconds = 100.0, 20.0, 1.0
    table = SharedBuckets.create(tmp_path / "buckets", capacity=64)
    admitted, checks, start, stop = run_workers(table.path, 4, seconds, default=[1.0, 3.0],
                                                cap=[cap_per_second, cap_burst], principals=200)
    assert admitted <= cap_burst + cap_per_second * seconds + 1
    assert checks > admitted
    assert_table_sound(table, start, stop, {(1.0, 3.0), (cap_per_second, cap_burst)})
    table.close()


# --- the file ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"tfgate: not this\n", b"\0" * 4096])
def test_a_file_that_is_not_a_bucket_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "buckets"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is not a tfgate rate-limit bucket file"):
        SharedBuckets.open(path)


def test_a_damaged_or_other_version_bucket_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "buckets"
    SharedBuckets.create(path, capacity=16).close()
    data = path.read_bytes()
    path.write_bytes(data[:-48])
    with pytest.raises(ValueError, match="not the 16 slots its header says"):
        SharedBuckets.open(path)
    path.write_bytes(data[:8] + (99).to_bytes(4, "little") + data[12:])
    with pytest.raises(ValueError, match="version 99"):
        SharedBuckets.open(path)


def test_create_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "buckets"
    path.write_text("something else\n")
    old = SharedBuckets.create(path, capacity=16)
    RateLimiter(Limits(default=Rate(1, 1)), store=old).check("alice", None, NO_RATES, "m", 0.0)
    assert len(old) == 1
    new = SharedBuckets.create(path, capacity=32)  # a restarted primary: a fresh table, zeroed
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (new.capacity, len(new)) == (32, 0)
    reopened = SharedBuckets.open(path)
    assert (reopened.capacity, len(reopened)) == (32, 0)
    assert [p.name for p in tmp_path.iterdir()] == ["buckets"]  # no temporary file left behind
    for table in (old, new, reopened):
        table.close()
