"""tensorflow_model_server's command line: names, defaults, both value forms, and clear failures."""

from __future__ import annotations

import subprocess
import sys

import pytest

from backend.flags import FlagError, ServerFlags, parse_flags


def test_defaults_are_tf_servings() -> None:
    flags = parse_flags(["--model_base_path=/m"])
    assert flags == ServerFlags(model_base_path="/m")
    assert (flags.port, flags.rest_api_port, flags.model_name) == (8500, 0, "default")
    assert (flags.rest_api_timeout_in_ms, flags.file_system_poll_wait_seconds) == (30000, 1)
    assert (flags.max_num_load_retries, flags.load_retry_interval_micros) == (5, 60_000_000)
    assert flags.enable_model_warmup and flags.tags == ("serve",)


def test_equals_and_space_forms_and_bools() -> None:
    flags = parse_flags(["--port", "9000", "--rest_api_port=9001", "--model_name", "m", "--model_base_path=/m",
                         "--enable_model_warmup=false", "--allow_version_labels_for_unavailable_models",
                         "--saved_model_tags", "serve,gpu"])
    assert (flags.port, flags.rest_api_port, flags.model_name) == (9000, 9001, "m")
    assert not flags.enable_model_warmup
    assert flags.allow_version_labels_for_unavailable_models
    assert flags.tags == ("serve", "gpu")
    spaced_bool = parse_flags(["--enable_model_warmup", "false", "--model_base_path", "/m"])
    assert not spaced_bool.enable_model_warmup


def test_inter_op_parallelism_at_or_below_zero_means_the_calling_thread() -> None:
    """Unlike the other counts, a negative inter-op count is meaningful (ConfigProto: run ops in the caller)."""
    flags = parse_flags(["--model_base_path=/m", "--tensorflow_inter_op_parallelism=-1"])
    assert flags.tensorflow_inter_op_parallelism == -1


@pytest.mark.parametrize("argv, message", [
    (["--model_base_path=/m", "--no_such_flag=1"], "unknown flag --no_such_flag"),
    (["--model_base_path=/m", "--grpc_socket_path=/s"], "does not support yet"),
    (["--model_base_path=/m", "--batching_parameters_file=/b"], "without --enable_batching"),
    (["--model_base_path=/m", "--port=abc"], "bad value for --port"),
    (["--model_base_path=/m", "--enable_model_warmup=maybe"], "bad value for --enable_model_warmup"),
    (["--model_base_path=/m", "--model_config_file=/c"], "both given"),
    ([], "no model to serve"),
    (["--model_base_path=/m", "--port=8501", "--rest_api_port=8501"], "must differ"),
    (["--model_base_path=/m", "--port"], "needs a value"),
    (["--model_base_path=/m", "--port=1", "--port=2"], "given twice"),
    (["--model_base_path=/m", "stray"], "unexpected argument"),
    (["--model_base_path=/m", "--rest_api_port=70000"], "between 0 and 65535"),
    (["--model_base_path=/m", "--workers=0"], "--workers must be between 1 and 256"),
    (["--model_base_path=/m", "--workers=2", "--port=0"], "--workers needs a port to share"),
    (["--model_base_path=/m", "--file_system_poll_wait_seconds=-1"], "must not be negative"),
    (["--model_base_path=/m", "--tensorflow_intra_op_parallelism=-1"], "must not be negative"),
])
def test_bad_command_lines_fail_clearly(argv: list[str], message: str) -> None:
    with pytest.raises(FlagError, match=message):
        parse_flags(argv)


def test_process_exits_2_with_the_message_on_bad_flags() -> None:
    result = subprocess.run([sys.executable, "-m", "backend", "--model_base_path=/m", "--bogus=1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown flag --bogus" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_every_flag() -> None:
    result = subprocess.run([sys.executable, "-m", "backend", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for name in ("--rest_api_port", "--model_config_file_poll_wait_seconds", "--saved_model_tags"):
        assert name in result.stdout
