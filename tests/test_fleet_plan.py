"""Fleet decisions as tables: nvidia-smi parsing, CUDA_VISIBLE_DEVICES, the worker plan and the restart policy."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from gateway.devices import Gpu, detect_gpus, parse_nvidia_smi_list
from gateway.fleet_plan import Worker, choose_pair, free_pair, plan_workers, port_flags, port_pair
from gateway.restart_policy import RestartPolicy

UUIDS = [f"GPU-{n}a2b3c4d-0000-1111-2222-33334444555{n}" for n in range(4)]
TWO_GPUS = (
    f"GPU 0: NVIDIA A100-SXM4-40GB (UUID: {UUIDS[0]})\n"
    f"GPU 1: NVIDIA A100-SXM4-40GB (UUID: {UUIDS[1]})\n"
)
FOUR_GPUS = "".join(f"GPU {n}: Tesla T4 (UUID: {UUIDS[n]})\n" for n in range(4))
WITH_MIG = (
    f"GPU 0: NVIDIA A100-SXM4-40GB (UUID: {UUIDS[0]})\n"
    "  MIG 1g.5gb     Device  0: (UUID: MIG-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee)\n"
    "  MIG 1g.5gb     Device  1: (UUID: MIG-ffffffff-bbbb-cccc-dddd-eeeeeeeeeeee)\n"
    f"GPU 1: NVIDIA A100-SXM4-40GB (UUID: {UUIDS[1]})\n"
)
GARBAGE = (
    "\n"
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"
    "GPU x: not a number (UUID: GPU-zz)\n"
    "   \n"
    f"GPU 3: Tesla T4 (UUID: {UUIDS[3]})   \n"
    "GPU 5: no uuid at all\n"
)
A100 = "NVIDIA A100-SXM4-40GB"
T4 = "Tesla T4"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        ("No devices were found\n", ()),
        (TWO_GPUS, (Gpu(0, A100, UUIDS[0]), Gpu(1, A100, UUIDS[1]))),
        (FOUR_GPUS, tuple(Gpu(n, T4, UUIDS[n]) for n in range(4))),
        (WITH_MIG, (Gpu(0, A100, UUIDS[0]), Gpu(1, A100, UUIDS[1]))),
        (TWO_GPUS.replace("\n", "\r\n"), (Gpu(0, A100, UUIDS[0]), Gpu(1, A100, UUIDS[1]))),
        (GARBAGE, (Gpu(3, T4, UUIDS[3]), Gpu(5, "no uuid at all", ""))),
    ],
    ids=["empty", "no-devices", "two", "four", "mig", "crlf", "garbage"],
)
def test_parse_nvidia_smi_list(text: str, expected: tuple[Gpu, ...]) -> None:
    assert parse_nvidia_smi_list(text) == expected


def fake_run(output: str | None) -> tuple[list[list[str]], Callable[[Sequence[str]], str | None]]:
    calls: list[list[str]] = []

    def run(argv: Sequence[str]) -> str | None:
        calls.append(list(argv))
        return output

    return calls, run


@pytest.mark.parametrize(
    ("smi", "visible", "expected"),
    [
        (FOUR_GPUS, None, [0, 1, 2, 3]),
        (FOUR_GPUS, "", []),
        (FOUR_GPUS, "-1", []),
        (FOUR_GPUS, " -1 ", []),
        (FOUR_GPUS, "2", [2]),
        (FOUR_GPUS, "3,1", [3, 1]),  # the listed order, not nvidia-smi's
        (FOUR_GPUS, "1, 2", [1, 2]),
        (FOUR_GPUS, f"{UUIDS[2]},{UUIDS[0]}", [2, 0]),
        (FOUR_GPUS, f"1,{UUIDS[3]}", [1, 3]),
        (FOUR_GPUS, f"1,{UUIDS[1]},1", [1]),  # the same GPU twice is one worker
        (FOUR_GPUS, "0,7,GPU-nope,MIG-aaaa,,x,3", [0, 3]),  # unknown entries are dropped
        (FOUR_GPUS, "7", []),
        ("", None, []),
        (None, None, []),  # no nvidia-smi: no GPU
        (None, "2,0", [2, 0]),  # no nvidia-smi: trust listed indexes
        (None, f"1,{UUIDS[0]}", [1]),  # no nvidia-smi: a UUID cannot be resolved
        (None, "-1", []),
    ],
)
def test_detect_gpus(smi: str | None, visible: str | None, expected: list[int]) -> None:
    calls, run = fake_run(smi)
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    gpus = detect_gpus(run, environ)
    assert [gpu.index for gpu in gpus] == expected
    assert calls in ([], [["nvidia-smi", "-L"]])


def test_detect_gpus_details() -> None:
    _, run = fake_run(FOUR_GPUS)
    assert detect_gpus(run, {"CUDA_VISIBLE_DEVICES": UUIDS[1]}) == (Gpu(1, T4, UUIDS[1]),)
    _, missing = fake_run(None)
    assert detect_gpus(missing, {"CUDA_VISIBLE_DEVICES": "1"}) == (Gpu(1, "unknown", ""),)


def test_detect_gpus_skips_nvidia_smi_when_gpus_are_hidden() -> None:
    calls, run = fake_run(FOUR_GPUS)
    assert detect_gpus(run, {"CUDA_VISIBLE_DEVICES": "-1"}) == ()
    assert calls == []


def plan(gpus: Sequence[Gpu], cpu_count: int = 8, cpu_replicas: int | None = None, base_port: int = 9000,
         extra_flags: Sequence[str] = (), reserved_ports: Sequence[int] = ()) -> tuple[Worker, ...]:
    return plan_workers(gpus, cpu_count=cpu_count, cpu_replicas=cpu_replicas, base_port=base_port,
                        extra_flags=extra_flags, reserved_ports=reserved_ports)


def threads(worker: Worker) -> tuple[str, str]:
    intra, inter = worker.flags[:2]
    return intra.partition("=")[2], inter.partition("=")[2]


@pytest.mark.parametrize(
    ("gpu_count", "cpu_count", "expected_threads"),
    [(2, 8, "4"), (4, 8, "2"), (4, 2, "1"), (2, 1, "1"), (4, 96, "24")],
)
def test_plan_gpu_workers(gpu_count: int, cpu_count: int, expected_threads: str) -> None:
    gpus = [Gpu(n + 2, T4, UUIDS[n]) for n in range(gpu_count)]  # indexes 2.. so worker and GPU index differ
    workers = plan(gpus, cpu_count=cpu_count, cpu_replicas=3)  # replicas apply to CPU workers only
    assert [worker.index for worker in workers] == list(range(gpu_count))
    for worker, gpu in zip(workers, gpus, strict=True):
        assert worker.gpu == gpu
        assert worker.env == {"CUDA_VISIBLE_DEVICES": str(gpu.index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        assert threads(worker) == (expected_threads, expected_threads)


@pytest.mark.parametrize(
    ("cpu_count", "cpu_replicas", "expected_replicas", "expected_intra"),
    [(2, None, 1, "2"), (8, None, 4, "2"), (1, None, 1, "1"), (8, 2, 2, "4"), (8, 3, 3, "2"), (2, 4, 4, "1")],
)
def test_plan_cpu_workers(cpu_count: int, cpu_replicas: int | None, expected_replicas: int,
                          expected_intra: str) -> None:
    workers = plan([], cpu_count=cpu_count, cpu_replicas=cpu_replicas)
    assert len(workers) == expected_replicas
    for worker in workers:
        assert worker.gpu is None
        assert worker.env == {"CUDA_VISIBLE_DEVICES": "-1"}
        assert threads(worker) == (expected_intra, "0")


def test_plan_flags() -> None:
    workers = plan([], cpu_count=8, cpu_replicas=3, base_port=9000, extra_flags=["--model_config_file_poll_wait_seconds", "5", "--x=1"])
    assert workers[1].flags == (
        "--tensorflow_intra_op_parallelism=2", "--tensorflow_inter_op_parallelism=0",
        "--model_config_file_poll_wait_seconds", "5", "--x=1",
    )


def test_port_pairs() -> None:
    assert [port_pair(9000, pair) for pair in range(3)] == [(9000, 9001), (9002, 9003), (9004, 9005)]
    assert port_flags(9000, 1) == ("--port=9002", "--rest_api_port=9003")


@pytest.mark.parametrize(
    ("preferred", "taken", "expected"),
    [(0, set(), 0), (2, {0, 1}, 2), (1, {1}, 0), (1, {0, 1, 2}, 3), (0, {0, 2}, 1)],
)
def test_free_pair(preferred: int, taken: set[int], expected: int) -> None:
    assert free_pair(preferred, taken) == expected


def test_plan_env_is_read_only() -> None:
    worker = plan([])[0]
    with pytest.raises(TypeError):
        worker.env["CUDA_VISIBLE_DEVICES"] = "0"  # type: ignore[index]


@pytest.mark.parametrize(
    ("flag", "name"),
    [
        ("--port=1", "port"),
        ("--port", "port"),
        ("-port=1", "port"),
        ("--rest_api_port=8501", "rest_api_port"),
        ("--tensorflow_intra_op_parallelism=8", "tensorflow_intra_op_parallelism"),
        ("--tensorflow_inter_op_parallelism", "tensorflow_inter_op_parallelism"),
        ("--bind_address=0.0.0.0", "bind_address"),
        ("--model_config_file=x", "model_config_file"),
        ("--model_base_path=/m", "model_base_path"),
        ("--enable_batching", "enable_batching"),
        ("--batching_parameters_file=b", "batching_parameters_file"),
    ],
)
def test_plan_refuses_planned_flags(flag: str, name: str) -> None:
    with pytest.raises(ValueError, match=f"--{name} "):
        plan([Gpu(0, T4, UUIDS[0])], extra_flags=["--x=m", flag, "1"])


def test_plan_accepts_lookalike_flags() -> None:
    workers = plan([], extra_flags=["--saved_model_tags", "port", "--portable=1", "--rest_api_timeout_in_ms=5"])
    assert workers[0].flags[-4:] == ("--saved_model_tags", "port", "--portable=1", "--rest_api_timeout_in_ms=5")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cpu_count": 0}, "cpu_count"),
        ({"cpu_replicas": 0}, "cpu_replicas"),
        ({"base_port": 0}, "base_port"),
        ({"base_port": 65529, "cpu_replicas": 3}, "base_port"),
    ],
)
def test_plan_refuses_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan([], **kwargs)


@pytest.mark.parametrize(("reserved", "clash"), [
    ((8443, 8999, 9008), None),  # two workers and a replacement: 9000..9005; 9006 up is free
    ((9006,), None),
    ((9000,), "9000"),
    ((9005, 8443, 9003), "9003, 9005"),  # named in order, the others left out
])
def test_plan_leaves_the_configs_own_ports_alone(reserved: tuple[int, ...], clash: str | None) -> None:
    if clash is None:
        assert len(plan([], cpu_replicas=2, reserved_ports=reserved)) == 2
        return
    with pytest.raises(ValueError, match=f"need ports 9000-9005, but the config already uses {clash} on this host"):
        plan([], cpu_replicas=2, reserved_ports=reserved)


def test_plan_last_port_may_be_65535() -> None:
    """Three workers and one replacement: four pairs, 65528..65535."""
    assert len(plan([], cpu_replicas=3, base_port=65528)) == 3


def crash(policy: RestartPolicy, rng: random.Random, started: float, ran_s: float) -> float | None:
    policy.on_started(started)
    return policy.on_exit(started + ran_s, rng)


def test_backoff_doubles_and_caps() -> None:
    policy = RestartPolicy(jitter=0.0, max_s=10.0, crash_loop_restarts=100)
    rng, now, delays = random.Random(1), 0.0, []
    for _ in range(8):
        delay = crash(policy, rng, now, 0.5)
        assert delay is not None
        delays.append(delay)
        now += 0.5 + delay
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0]
    assert policy.restarts == 8 and not policy.gave_up


@pytest.mark.parametrize("multiplier", [1.0, 3.0, 1e300])
def test_backoff_other_multipliers(multiplier: float) -> None:
    policy = RestartPolicy(jitter=0.0, initial_s=2.0, max_s=50.0, multiplier=multiplier, crash_loop_restarts=1000)
    delays = [policy.on_exit(float(n * 100), random.Random(0)) for n in range(6)]
    expected = [min(2.0 * multiplier**n, 50.0) for n in range(6)] if multiplier < 1e300 else [2.0] + [50.0] * 5
    assert delays == expected


def test_jitter_bounds_with_seeded_rng() -> None:
    rng = random.Random(42)
    policy = RestartPolicy(jitter=0.2, crash_loop_restarts=10_000)
    nominal = [min(2.0**n, 60.0) for n in range(40)]
    delays = [policy.on_exit(float(n * 1000), rng) for n in range(40)]
    for delay, expected in zip(delays, nominal, strict=True):
        assert delay is not None
        assert expected * 0.8 <= delay <= expected * 1.2
    spread = [delay / expected for delay, expected in zip(delays, nominal, strict=True) if delay is not None]
    assert min(spread) < 0.9 and max(spread) > 1.1  # the jitter really spreads, both ways
    again, rng = RestartPolicy(jitter=0.2, crash_loop_restarts=10_000), random.Random(42)
    assert [again.on_exit(float(n * 1000), rng) for n in range(40)] == delays  # seeded: repeatable


@pytest.mark.parametrize(
    ("runs", "expected"),
    [
        # (seconds each run lasted) -> unjittered delays: a run >= healthy_after_s (60) starts the backoff over
        ([1, 1, 1, 60, 1, 1], [1.0, 2.0, 4.0, 1.0, 2.0, 4.0]),
        ([1, 1, 59.9, 1], [1.0, 2.0, 4.0, 8.0]),
        ([100, 100, 100], [1.0, 1.0, 1.0]),
        ([1, 1, 1, 1, 3600, 1], [1.0, 2.0, 4.0, 8.0, 1.0, 2.0]),
    ],
)
def test_healthy_run_resets_backoff(runs: list[float], expected: list[float]) -> None:
    policy = RestartPolicy(jitter=0.0, crash_loop_restarts=100)
    rng, now, delays = random.Random(0), 0.0, []
    for ran_s in runs:
        delay = crash(policy, rng, now, ran_s)
        assert delay is not None
        delays.append(delay)
        now += ran_s + delay
    assert delays == expected


def test_exit_without_start_is_a_crash() -> None:
    policy = RestartPolicy(jitter=0.0)
    policy.on_started(0.0)
    assert policy.on_exit(100.0, random.Random(0)) == 1.0
    assert policy.on_exit(500.0, random.Random(0)) == 2.0  # no on_started since: the old start does not count


@pytest.mark.parametrize(
    ("exit_times", "crash_loop_restarts", "gives_up_at"),
    [
        ([0, 1, 3, 7, 15, 31], 5, 5),  # the 6th exit within 120 s
        ([0, 1, 3, 7, 15], 5, None),
        ([0, 121, 122, 123, 124, 125], 5, None),  # the first exit fell out of the window: 5 within it
        ([0, 10, 20, 121, 122, 123, 124], 5, 6),  # 0 fell out, 10 and 20 did not
        ([0, 60, 120, 180, 240, 300, 360, 420], 2, None),  # never more than 2 within 120 s (boundary excluded)
        ([0, 60, 119], 2, 2),
        ([0], 0, 0),  # zero restarts allowed: give up on the first exit
    ],
)
def test_gives_up_on_crash_loop(exit_times: list[float], crash_loop_restarts: int, gives_up_at: int | None) -> None:
    policy = RestartPolicy(crash_loop_restarts=crash_loop_restarts, crash_loop_window_s=120.0)
    rng = random.Random(7)
    results = [policy.on_exit(float(now), rng) for now in exit_times]
    given_up = [n for n, result in enumerate(results) if result is None]
    assert given_up[:1] == ([] if gives_up_at is None else [gives_up_at])
    assert policy.gave_up == (gives_up_at is not None)
    assert policy.restarts == (len(exit_times) if gives_up_at is None else gives_up_at)


def test_gave_up_is_final() -> None:
    policy = RestartPolicy(crash_loop_restarts=1, crash_loop_window_s=10.0)
    rng = random.Random(0)
    assert policy.on_exit(0.0, rng) is not None
    assert policy.on_exit(1.0, rng) is None
    policy.on_started(2.0)
    assert policy.on_exit(10_000.0, rng) is None  # even after a long healthy run
    assert policy.gave_up and policy.restarts == 1


@pytest.mark.parametrize(
    "kwargs",
    [{"initial_s": 0.0}, {"initial_s": 5.0, "max_s": 1.0}, {"multiplier": 0.5}, {"jitter": 1.0}, {"jitter": -0.1},
     {"crash_loop_restarts": -1}, {"crash_loop_window_s": 0.0}, {"healthy_after_s": -1.0}],
)
def test_policy_refuses_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(**kwargs)


BASE = 9000


def _held(*ports: int) -> Callable[[int], bool]:
    """`bindable` for ports another program holds."""
    return lambda port: port not in ports


@pytest.mark.parametrize(
    ("index", "used", "held", "expected", "skipped"),
    [
        (0, set(), (), 0, ()),  # its own pair
        (1, {9000, 9001}, (), 1, ()),  # a sibling on its own pair is no obstacle
        # worker 0's replacement in a rolling change: its old process holds pair 0, and pair 1 is worker 1's own
        (0, {9000, 9001, 9002, 9003}, (), 2, ()),
        (0, {9000, 9001}, (), 2, ()),  # ...even while worker 1 is down: it would lose its own pair
        (1, {9000, 9001, 9004, 9005}, (), 1, ()),  # the replacement of worker 0 on pair 2 leaves pair 1 to worker 1
        (0, {9004}, (9001,), 3, ((9001,),)),  # another program holds worker 0's REST port; pair 2 is a starting
        # replacement's claim (one port is enough): the next pair nobody holds
        (1, set(), (9002, 9003, 9005), 3, ((9002, 9003), (9005,))),  # every busy pair passed over, and logged
    ],
)
def test_choose_pair(index: int, used: set[int], held: tuple[int, ...], expected: int,
                     skipped: tuple[tuple[int, ...], ...]) -> None:
    choice = choose_pair(BASE, index, 2, used, _held(*held))
    assert (choice.pair, choice.skipped) == (expected, skipped)


def test_choose_pair_gives_up_after_its_probes() -> None:
    """Past `probes` busy pairs the last one is taken anyway: the worker's exit at its bind is reported."""
    choice = choose_pair(BASE, 0, 1, set(), lambda _port: False, probes=3)
    assert choice.pair == 3 and len(choice.skipped) == 3
