"""A loaded version's compiled steps: the one most requests use is made while the version loads, and threads that
miss the same step together make it once."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from backend import errors
from backend.servable import Servable, load_servable, session_config


@pytest.fixture
def steps_made(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The CallableOptions of every step TensorFlow is asked to make (the real method still makes them)."""
    made: list[Any] = []
    make = tf.compat.v1.Session._make_callable_from_options

    def counted(session: tf.compat.v1.Session, options: Any) -> Any:
        made.append(options)
        return make(session, options)

    monkeypatch.setattr(tf.compat.v1.Session, "_make_callable_from_options", counted)
    yield made


def _mlp(demo_models: Path) -> Servable:
    return load_servable("mlp", 1, demo_models / "mlp" / "1", ("serve",), session_config(0, 0))


def test_the_all_outputs_step_is_made_at_load(demo_models: Path, steps_made: list[Any]) -> None:
    servable = _mlp(demo_models)
    made_at_load = len(steps_made)
    assert made_at_load == len(servable.signatures)
    signature = servable.signature("")
    outputs = signature.run({"x": np.zeros((2, 784), np.float32)}, tuple(signature.outputs))
    assert outputs["probabilities"].shape == (2, 10)
    assert len(steps_made) == made_at_load


def test_threads_missing_one_step_together_make_it_once(demo_models: Path, steps_made: list[Any]) -> None:
    signature = _mlp(demo_models).signature("")
    before = len(steps_made)
    start = threading.Barrier(8)
    shapes: list[tuple[int, ...]] = []

    def call() -> None:
        start.wait()
        shapes.append(signature.run({"x": np.zeros((1, 784), np.float32)}, ("probabilities",))["probabilities"].shape)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert shapes == [(1, 10)] * 8
    assert len(steps_made) == before + 1


def test_a_signature_whose_step_cannot_be_made_still_loads_and_its_requests_say_why(
        demo_models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    version = tmp_path / "1"
    shutil.copytree(demo_models / "half_plus_two_tf1" / "123", version)
    saved_model = saved_model_pb2.SavedModel.FromString((version / "saved_model.pb").read_bytes())
    signatures = saved_model.meta_graphs[0].signature_def
    signatures["broken"].CopyFrom(signatures["serving_default"])
    next(iter(signatures["broken"].outputs.values())).name = "no_such_tensor:0"
    (version / "saved_model.pb").write_bytes(saved_model.SerializeToString())

    with caplog.at_level(logging.WARNING, logger="backend.servable"):
        servable = load_servable("broken", 1, version, ("serve",), session_config(0, 0))
    assert "'broken': its step could not be made at load time" in caplog.text
    default = servable.signature("")
    outputs = default.run({"x": np.array([1.0], np.float32)}, tuple(default.outputs))
    assert next(iter(outputs.values())).tolist() == [2.5]
    broken = servable.signature("broken")
    with pytest.raises(errors.ServingError, match="no_such_tensor"):
        broken.run({"x": np.array([1.0], np.float32)}, tuple(broken.outputs))
