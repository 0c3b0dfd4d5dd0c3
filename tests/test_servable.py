"""A loaded version's compiled steps: the one most requests use is made while the version loads, and threads that
miss the same step together make it once."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import tensorflow as tf

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
