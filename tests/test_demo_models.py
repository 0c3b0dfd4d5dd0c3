"""The demo models load with plain TensorFlow and compute what the quick start and tests expect."""

from __future__ import annotations

import fcntl
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import fingerprint_pb2, saved_model_pb2
from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting
from tensorflow_serving.apis import prediction_log_pb2

from backend import demo_models

MODELS = {"half_plus_two": ["1", "2"], "half_plus_two_tf1": ["123"], "mlp": ["1"], "strings": ["1"]}
CLASSIFY = "tensorflow/serving/classify"
REGRESS = "tensorflow/serving/regress"
PREDICT = "tensorflow/serving/predict"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo-models")
    demo_models.build_demo_models(out)
    return out


def _example(**features: list[float]) -> bytes:
    feature = {k: tf.train.Feature(float_list=tf.train.FloatList(value=v)) for k, v in features.items()}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _method_names(export_dir: Path) -> dict[str, str]:
    saved_model = saved_model_pb2.SavedModel.FromString((export_dir / "saved_model.pb").read_bytes())
    (meta_graph,) = saved_model.meta_graphs
    return {k: v.method_name for k, v in meta_graph.signature_def.items() if k != "__saved_model_init_op"}


def test_layout(built: Path) -> None:
    assert {p.name: sorted(v.name for v in p.iterdir()) for p in built.iterdir()} == MODELS
    for name, versions in MODELS.items():
        for version in versions:
            assert (built / name / version / "saved_model.pb").is_file()
            assert (built / name / version / "variables").is_dir()


@pytest.mark.parametrize(("version", "plus", "c"), [("1", 2.0, 3.0), ("2", 3.0, 4.0)])
def test_half_plus_two(built: Path, version: str, plus: float, c: float) -> None:
    signatures = tf.saved_model.load(str(built / "half_plus_two" / version)).signatures
    predict = signatures["serving_default"]
    np.testing.assert_allclose(predict(x=tf.constant([1.0, 2.0, 5.0]))["y"], [0.5 + plus, 1.0 + plus, 2.5 + plus])
    np.testing.assert_allclose(predict(x=tf.constant([[1.0], [2.0]]))["y"], [[0.5 + plus], [1.0 + plus]])

    examples = tf.constant([_example(x=[1.0], x2=[4.0]), _example(x=[2.0])])
    np.testing.assert_allclose(signatures["classify_x_to_y"](inputs=examples)["scores"], [[0.5 + plus], [1.0 + plus]])
    np.testing.assert_allclose(signatures["regress_x_to_y"](inputs=examples)["outputs"], [[0.5 + plus], [1.0 + plus]])
    np.testing.assert_allclose(signatures["regress_x_to_y2"](inputs=examples)["outputs"], [[0.5 + c], [1.0 + c]])
    np.testing.assert_allclose(signatures["regress_x2_to_y3"](inputs=examples)["outputs"], [[2.0 + c], [c]])


@pytest.mark.parametrize(("name", "version"), [("half_plus_two", "1"), ("half_plus_two", "2"), ("half_plus_two_tf1", "123")])
def test_half_plus_two_method_names(built: Path, name: str, version: str) -> None:
    assert _method_names(built / name / version) == {
        "serving_default": PREDICT,
        "classify_x_to_y": CLASSIFY,
        "regress_x_to_y": REGRESS,
        "regress_x_to_y2": REGRESS,
        "regress_x2_to_y3": REGRESS,
    }


def test_patched_models_keep_a_matching_fingerprint(built: Path) -> None:
    for export_dir in (built / "half_plus_two" / "1", built / "mlp" / "1"):
        stored = fingerprint_pb2.FingerprintDef.FromString((export_dir / "fingerprint.pb").read_bytes())
        fresh = fingerprint_pb2.FingerprintDef.FromString(fingerprinting.CreateFingerprintDef(str(export_dir)))
        stored.ClearField("uuid")  # random per write
        fresh.ClearField("uuid")
        assert stored == fresh


def test_tf1_model_loads_in_a_session(built: Path) -> None:
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        meta_graph = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(built / "half_plus_two_tf1" / "123"))
        predict = meta_graph.signature_def["serving_default"]
        assert predict.inputs["x"].tensor_shape.unknown_rank
        y = sess.run(predict.outputs["y"].name, {predict.inputs["x"].name: [1.0, 2.0, 5.0]})
        np.testing.assert_allclose(y, [2.5, 3.0, 4.5])

        regress = meta_graph.signature_def["regress_x_to_y2"]
        outputs = sess.run(regress.outputs["outputs"].name, {regress.inputs["inputs"].name: [_example(x=[1.0])]})
        np.testing.assert_allclose(outputs, [[3.5]])


def test_tf1_warmup_requests(built: Path) -> None:
    path = built / "half_plus_two_tf1" / "123" / "assets.extra" / "tf_serving_warmup_requests"
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]
    assert [log.WhichOneof("log_type") for log in logs] == ["predict_log", "predict_log", "regress_log"]
    for log in logs[:2]:
        request = log.predict_log.request
        assert (request.model_spec.name, request.model_spec.signature_name) == ("half_plus_two_tf1", "serving_default")
        assert tf.make_ndarray(request.inputs["x"]).dtype == np.float32
    regress = logs[2].regress_log.request
    assert regress.model_spec.signature_name == "regress_x_to_y"
    assert list(regress.input.example_list.examples[0].features.feature["x"].float_list.value) == [1.0]


def test_mlp(built: Path) -> None:
    export_dir = built / "mlp" / "1"
    assert _method_names(export_dir) == {"serving_default": PREDICT, "classify": CLASSIFY}
    signatures = tf.saved_model.load(str(export_dir)).signatures
    x = np.random.default_rng(0).random((4, 784), dtype=np.float32)

    out = signatures["serving_default"](x=tf.constant(x))
    probabilities = out["probabilities"].numpy()
    assert probabilities.shape == (4, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert out["class_id"].dtype == tf.int64
    np.testing.assert_array_equal(out["class_id"], probabilities.argmax(axis=1))

    classified = signatures["classify"](inputs=tf.constant([_example(x=row.tolist()) for row in x[:2]]))
    assert classified["classes"].numpy().tolist() == [[str(i).encode() for i in range(10)]] * 2
    np.testing.assert_allclose(classified["scores"], probabilities[:2], rtol=1e-5)


def test_strings(built: Path) -> None:
    predict = tf.saved_model.load(str(built / "strings" / "1")).signatures["serving_default"]
    out = predict(text=tf.constant([b"hello", b"", "h\u00e9".encode()]))
    assert out["length"].numpy().tolist() == [5, 0, 3]  # bytes, not characters
    assert out["upper_bytes"].numpy().tolist() == [b"HELLO", b"", "H\u00e9".encode()]


def test_demo_models_dir_is_keyed_by_source_hash(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TFGATE_CACHE_DIR", str(tmp_path))
    path = demo_models.demo_models_dir()
    assert path.parent == tmp_path / "demo-models"
    assert re.fullmatch(r"[0-9a-f]{12}", path.name)

    monkeypatch.setenv("TFGATE_CACHE_DIR", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo_models.demo_models_dir() == tmp_path / "home" / ".cache" / "tfgate" / "demo-models" / path.name


def test_ensure_waits_for_the_lock_holder_and_uses_its_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TFGATE_CACHE_DIR", str(tmp_path))
    final = demo_models.demo_models_dir()
    final.parent.mkdir(parents=True)
    result: list[Path] = []
    with open(final.parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # play the process that is building
        waiter = threading.Thread(target=lambda: result.append(demo_models.ensure_demo_models()))
        waiter.start()
        waiter.join(timeout=0.5)
        assert waiter.is_alive() and list(final.parent.iterdir()) == [Path(lock.name)]
        final.mkdir()  # the "build" lands by rename, then the lock is released
    waiter.join(timeout=10)
    assert result == [final]
    assert list(final.iterdir()) == []  # used as is, not rebuilt


def test_cli_uses_an_existing_out_dir_and_rebuilds_with_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "models"
    out.mkdir()
    (out / "stale").touch()
    demo_models.main(["--out", str(out)])
    assert capsys.readouterr().out == f"{out}\n"
    assert [p.name for p in out.iterdir()] == ["stale"]

    demo_models.main(["--out", str(out), "--force"])
    captured = capsys.readouterr()
    assert captured.out == f"{out}\n"
    assert "building mlp v1 …" in captured.err
    assert sorted(p.name for p in out.iterdir()) == sorted(MODELS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "models.lock"]  # no staging left behind
