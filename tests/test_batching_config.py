"""Batching parameters as TF Serving reads them, and the declared TF Serving protos behind them: plain parsing, no
TensorFlow runs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pool

from backend import declared_protos
from backend.batching_config import (
    PER_MODEL_FILE,
    BatchingConfigError,
    BatchingParameters,
    parse_batching_parameters,
    read_batching_parameters,
    read_model_batching_parameters,
)
from backend.ssl_config import SSLConfigError, read_ssl_config

FULL = """
max_batch_size { value: 32 }
batch_timeout_micros { value: 2500 }
max_enqueued_batches { value: 100 }
num_batch_threads { value: 4 }
allowed_batch_sizes: 8
allowed_batch_sizes: 16
allowed_batch_sizes: 32
pad_variable_length_inputs: true
"""


def test_absent_fields_take_tf_servings_defaults() -> None:
    parameters = parse_batching_parameters("")
    assert parameters == BatchingParameters(max_batch_size=1000, batch_timeout_micros=0, max_enqueued_batches=10,
                                            num_batch_threads=len(os.sched_getaffinity(0)), allowed_batch_sizes=(),
                                            pad_variable_length_inputs=False, ignored_fields=())
    assert parameters == BatchingParameters()  # what --enable_batching alone gives
    assert parameters.batch_timeout_s == 0.0


def test_a_full_file(tmp_path: Path) -> None:
    path = tmp_path / "batching.config"
    path.write_text(FULL)
    assert read_batching_parameters(path) == BatchingParameters(
        max_batch_size=32, batch_timeout_micros=2500, max_enqueued_batches=100, num_batch_threads=4,
        allowed_batch_sizes=(8, 16, 32), pad_variable_length_inputs=True, ignored_fields=())
    assert read_batching_parameters(path).batch_timeout_s == pytest.approx(0.0025)


@pytest.mark.parametrize(("cpus", "batch_threads", "intra_op"), [(2, 2, 1), (8, 2, 4), (8, 3, 2), (2, 4, 1), (1, 1, 1)])
def test_intra_op_threads_split_the_cpus_among_the_batches_that_run_at_once(cpus: int, batch_threads: int,
                                                                            intra_op: int) -> None:
    assert BatchingParameters(num_batch_threads=batch_threads).intra_op_threads(cpus) == intra_op


def test_a_set_zero_is_not_an_absent_field() -> None:
    """The wrapper types tell "absent" (TF Serving's default) from an explicit value, even a default-looking one."""
    with pytest.raises(BatchingConfigError, match="max_enqueued_batches must be positive, not 0"):
        parse_batching_parameters("max_enqueued_batches { }")


def test_allowed_batch_sizes_end_at_the_default_max_batch_size() -> None:
    assert parse_batching_parameters("allowed_batch_sizes: [100, 1000]").allowed_batch_sizes == (100, 1000)


def test_fields_tfgate_does_not_act_on_parse_and_are_listed() -> None:
    parameters = parse_batching_parameters("""
        max_batch_size { value: 64 }
        thread_pool_name { value: "model_server_batch_threads" }
        enable_large_batch_splitting { value: true }
        max_execution_batch_size { value: 16 }""")
    assert parameters.max_batch_size == 64
    assert parameters.ignored_fields == ("thread_pool_name", "enable_large_batch_splitting",
                                         "max_execution_batch_size")


@pytest.mark.parametrize("text, message", [
    ("max_batch_size { value: 0 }", "max_batch_size must be positive, not 0"),
    ("max_enqueued_batches { value: -1 }", "max_enqueued_batches must be positive, not -1"),
    ("num_batch_threads { value: 0 }", "num_batch_threads must be positive, not 0"),
    ("batch_timeout_micros { value: -5 }", "batch_timeout_micros must not be negative, not -5"),
    ("max_batch_size { value: 8 } allowed_batch_sizes: [4, 4, 8]", r"strictly increasing, not \[4, 4, 8\]"),
    ("max_batch_size { value: 8 } allowed_batch_sizes: [8, 4]", r"strictly increasing, not \[8, 4\]"),
    ("max_batch_size { value: 8 } allowed_batch_sizes: [0, 8]", r"positive and strictly increasing, not \[0, 8\]"),
    ("max_batch_size { value: 8 } allowed_batch_sizes: [2, 4]", r"must equal max_batch_size \(8\), not 4"),
    ("allowed_batch_sizes: [2, 4]", r"must equal max_batch_size \(1000\), not 4"),
    ("max_batch_size: 8", 'Expected "{"'),
    ("max_batch_size { value: 1.5 }", "Couldn't parse integer"),
    ("batch_size { value: 8 }", 'no field named "batch_size"'),
])
def test_bad_parameters_name_the_source_and_field(text: str, message: str) -> None:
    with pytest.raises(BatchingConfigError, match=f"^batch.config: .*{message}"):
        parse_batching_parameters(text, source="batch.config")


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "batching.config"
    path.write_text("max_batch_size {\n  value: 0\n}\n")
    with pytest.raises(BatchingConfigError, match=f"^{re.escape(str(path))}: max_batch_size must be positive"):
        read_batching_parameters(path)
    path.write_text("max_batch_size {\n  value: x\n}\n")
    with pytest.raises(BatchingConfigError, match=f"^{re.escape(str(path))}: 2:10 "):  # the line at fault
        read_batching_parameters(path)
    with pytest.raises(BatchingConfigError, match="cannot read batching parameters file .*absent"):
        read_batching_parameters(tmp_path / "absent")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(BatchingConfigError, match="is not UTF-8 text"):
        read_batching_parameters(path)


def test_per_model_file_in_the_version_directory(tmp_path: Path) -> None:
    version_dir = tmp_path / "model" / "1"
    version_dir.mkdir(parents=True)
    assert read_model_batching_parameters(version_dir) is None
    (version_dir / PER_MODEL_FILE).write_text("max_batch_size { value: 10 } batch_timeout_micros { value: 100 }")
    assert read_model_batching_parameters(version_dir) == BatchingParameters(max_batch_size=10,
                                                                             batch_timeout_micros=100)
    (version_dir / PER_MODEL_FILE).write_text("max_batch_size { value: -10 }")
    with pytest.raises(BatchingConfigError, match=f"^{re.escape(str(version_dir / PER_MODEL_FILE))}: "):
        read_model_batching_parameters(version_dir)


def test_declared_messages_stay_out_of_the_default_pool() -> None:
    """A later serving-api release that registers the real modules there must not clash with ours."""
    for message_class in (declared_protos.SSLConfig, declared_protos.MonitoringConfig,
                          declared_protos.BatchingParameters):
        name = message_class.DESCRIPTOR.full_name
        assert name.startswith("tensorflow.serving.")
        with pytest.raises(KeyError):
            descriptor_pool.Default().FindMessageTypeByName(name)


def test_parse_text_names_the_source() -> None:
    message = declared_protos.parse_text(declared_protos.SSLConfig, "client_verify: true", "ssl.config")
    assert message.client_verify is True
    with pytest.raises(declared_protos.ProtoTextError, match='^ssl.config: 1:1 : .*no field named "verify"'):
        declared_protos.parse_text(declared_protos.SSLConfig, "verify: true", "ssl.config")


def test_ssl_config_file(tmp_path: Path) -> None:
    path = tmp_path / "ssl.config"
    path.write_text('server_key: "KEY"\nserver_cert: "CERT"\n')
    ssl = read_ssl_config(path)
    assert (ssl.server_key, ssl.server_cert, ssl.custom_ca, ssl.client_verify) == (b"KEY", b"CERT", None, False)
    path.write_text('server_key: "KEY"\nserver_cert: "CERT"\nclient_verify: true\n')
    with pytest.raises(SSLConfigError, match="client_verify needs custom_ca"):
        read_ssl_config(path)
    path.write_text('server_key: "KEY"\nserver_cert: CERT\n')
    with pytest.raises(SSLConfigError, match=f"^{re.escape(str(path))}: 2:14 "):
        read_ssl_config(path)
    with pytest.raises(SSLConfigError, match="cannot read SSL config file .*absent"):
        read_ssl_config(tmp_path / "absent")
