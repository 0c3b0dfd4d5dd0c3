"""Builds the demo SavedModels served by the quick start and the tests, with no download.

Layout is TF Serving's: ``OUT/<model>/<version>/saved_model.pb`` plus ``variables/``.

- ``half_plus_two`` v1 and v2: native TF2, the signatures of TF Serving's
  ``saved_model_half_plus_two.py`` test model. v2 adds 3 instead of 2 (and c = 4) so tests can tell
  the versions apart.
- ``half_plus_two_tf1`` v123: the same v1 math exported the TF1 way (graph, Session, SavedModelBuilder,
  shapeless placeholder), with a warm-up file in ``assets.extra/``.
- ``mlp`` v1: a seeded, untrained 784→1024→1024→10 classifier, big enough to make batching measurable.
- ``strings`` v1: string in, string out; the ``_bytes`` output suffix makes TF Serving's REST API base64 it.

The built tree is cached outside git under a directory named by the hash of this file, so editing the
builders rebuilds. Concurrency: builders write into a temporary sibling under an ``flock`` and publish
it with one ``os.rename``; a reader that finds the final directory uses it without locking.
TensorFlow is imported inside the builders so a cache hit (and ``--help``) never pays for it.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

# TF2's saver stamps every signature "predict"; TF Serving routes Classify/Regress by method name.
_CLASSIFY = "tensorflow/serving/classify"
_REGRESS = "tensorflow/serving/regress"

_MLP_SEED = 20240601
_MLP_SIZES = (784, 1024, 1024, 10)


def _patch_method_names(export_dir: Path, method_names: dict[str, str]) -> None:
    """Rewrites signature method names in saved_model.pb, then re-fingerprints the changed file."""
    import tensorflow as tf
    from tensorflow.python.saved_model import (
        fingerprinting_utils,  # the saver's own (private) writer
    )

    updater = tf.compat.v1.saved_model.signature_def_utils.MethodNameUpdater(str(export_dir))
    for key, method in method_names.items():
        updater.replace_method_name(signature_key=key, method_name=method)
    updater.save()
    # fingerprint.pb holds a checksum of saved_model.pb; a stale one would misreport the model's identity.
    fingerprinting_utils.write_fingerprint(str(export_dir))
    tf.saved_model.load(str(export_dir))  # the object graph must still resolve after the rewrite


def _build_half_plus_two(export_dir: Path, b: float, c: float) -> None:
    """TF2 y = 0.5*x + b with TF Serving's five signature names; all but serving_default read tf.Example."""
    import tensorflow as tf

    features = {
        "x": tf.io.FixedLenFeature([1], tf.float32),
        "x2": tf.io.FixedLenFeature([1], tf.float32, default_value=[0.0]),
    }
    examples = tf.TensorSpec([None], tf.string)

    class HalfPlusTwo(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = tf.Variable(0.5, name="a")
            self.b = tf.Variable(b, name="b")
            self.c = tf.Variable(c, name="c")

        # Unknown rank so both [1., 2.] and [[1.], [2.]] are valid "instances".
        @tf.function(input_signature=[tf.TensorSpec(None, tf.float32)])
        def predict(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"y": self.a * x + self.b}

        @tf.function(input_signature=[examples])
        def classify_x_to_y(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
            x = tf.io.parse_example(inputs, features)["x"]
            return {"scores": self.a * x + self.b}

        @tf.function(input_signature=[examples])
        def regress_x_to_y(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
            x = tf.io.parse_example(inputs, features)["x"]
            return {"outputs": self.a * x + self.b}

        @tf.function(input_signature=[examples])
        def regress_x_to_y2(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
            x = tf.io.parse_example(inputs, features)["x"]
            return {"outputs": self.a * x + self.c}

        @tf.function(input_signature=[examples])
        def regress_x2_to_y3(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
            x2 = tf.io.parse_example(inputs, features)["x2"]
            return {"outputs": self.a * x2 + self.c}

    module = HalfPlusTwo()
    signatures = {
        "serving_default": module.predict,
        "classify_x_to_y": module.classify_x_to_y,
        "regress_x_to_y": module.regress_x_to_y,
        "regress_x_to_y2": module.regress_x_to_y2,
        "regress_x2_to_y3": module.regress_x2_to_y3,
    }
    tf.saved_model.save(module, str(export_dir), signatures=signatures)
    _patch_method_names(
        export_dir,
        {"classify_x_to_y": _CLASSIFY, "regress_x_to_y": _REGRESS, "regress_x_to_y2": _REGRESS, "regress_x2_to_y3": _REGRESS},
    )


def _build_half_plus_two_tf1(export_dir: Path) -> None:
    """The v1 math as a TF1 graph export: what older model repositories actually contain."""
    import tensorflow as tf

    v1 = tf.compat.v1
    sig = v1.saved_model.signature_def_utils
    # A private graph keeps the process in eager mode for the TF2 builders.
    with tf.Graph().as_default(), v1.Session() as sess:
        a = v1.Variable(0.5, name="a", use_resource=False)
        b = v1.Variable(2.0, name="b", use_resource=False)
        c = v1.Variable(3.0, name="c", use_resource=False)
        x = v1.placeholder(tf.float32, name="x")  # no shape: its TensorInfo has unknown rank
        y = tf.identity(a * x + b, name="y")
        tf_example = v1.placeholder(tf.string, shape=[None], name="tf_example")
        parsed = v1.parse_example(
            tf_example,
            {
                "x": v1.FixedLenFeature([1], tf.float32),
                "x2": v1.FixedLenFeature([1], tf.float32, default_value=[0.0]),
            },
        )
        y_ex = tf.identity(a * parsed["x"] + b, name="y_from_example")
        y2_ex = tf.identity(a * parsed["x"] + c, name="y2_from_example")
        y3_ex = tf.identity(a * parsed["x2"] + c, name="y3_from_example")
        signature_def_map = {
            "serving_default": sig.predict_signature_def(inputs={"x": x}, outputs={"y": y}),
            "classify_x_to_y": sig.classification_signature_def(tf_example, classes=None, scores=y_ex),
            "regress_x_to_y": sig.regression_signature_def(tf_example, y_ex),
            "regress_x_to_y2": sig.regression_signature_def(tf_example, y2_ex),
            "regress_x2_to_y3": sig.regression_signature_def(tf_example, y3_ex),
        }
        sess.run(v1.global_variables_initializer())
        builder = v1.saved_model.builder.SavedModelBuilder(str(export_dir))
        builder.add_meta_graph_and_variables(sess, ["serve"], signature_def_map=signature_def_map)
        builder.save()
    _write_tf1_warmup(export_dir)


def _write_tf1_warmup(export_dir: Path) -> None:
    """TF Serving replays assets.extra/tf_serving_warmup_requests at load; covers predict and regress."""
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2, regression_pb2

    logs = []
    for value in (np.array([1.0, 2.0, 5.0], np.float32), np.array([[1.0], [2.0]], np.float32)):
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "half_plus_two_tf1"
        request.model_spec.signature_name = "serving_default"
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(value))
        logs.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
    regress = regression_pb2.RegressionRequest()
    regress.model_spec.name = "half_plus_two_tf1"
    regress.model_spec.signature_name = "regress_x_to_y"
    example = regress.input.example_list.examples.add()
    example.features.feature["x"].float_list.value.append(1.0)
    logs.append(prediction_log_pb2.PredictionLog(regress_log=prediction_log_pb2.RegressLog(request=regress)))

    extra = export_dir / "assets.extra"
    extra.mkdir()
    with tf.io.TFRecordWriter(str(extra / "tf_serving_warmup_requests")) as writer:
        for log in logs:
            writer.write(log.SerializeToString())


def _build_mlp(export_dir: Path) -> None:
    """Seeded random weights: the outputs are meaningless but deterministic, and the work is real."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(_MLP_SEED)
    layers = []
    for fan_in, fan_out in zip(_MLP_SIZES, _MLP_SIZES[1:]):
        w = rng.standard_normal((fan_in, fan_out), dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        layers.append((tf.Variable(w), tf.Variable(np.zeros(fan_out, np.float32))))
    labels = tf.constant([[str(i).encode() for i in range(_MLP_SIZES[-1])]])

    class Mlp(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = layers

        def _probabilities(self, x: tf.Tensor) -> tf.Tensor:
            (w1, b1), (w2, b2), (w3, b3) = self.layers
            h = tf.nn.relu(x @ w1 + b1)
            h = tf.nn.relu(h @ w2 + b2)
            return tf.nn.softmax(h @ w3 + b3)

        @tf.function(input_signature=[tf.TensorSpec([None, _MLP_SIZES[0]], tf.float32)])
        def predict(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            probabilities = self._probabilities(x)
            return {"probabilities": probabilities, "class_id": tf.argmax(probabilities, axis=1, output_type=tf.int64)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def classify(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
            x = tf.io.parse_example(inputs, {"x": tf.io.FixedLenFeature([_MLP_SIZES[0]], tf.float32)})["x"]
            return {"classes": tf.tile(labels, [tf.shape(x)[0], 1]), "scores": self._probabilities(x)}

    module = Mlp()
    tf.saved_model.save(module, str(export_dir), signatures={"serving_default": module.predict, "classify": module.classify})
    _patch_method_names(export_dir, {"classify": _CLASSIFY})


def _build_strings(export_dir: Path) -> None:
    """Exercises DT_STRING both ways: plain-text input and an output the REST API must base64."""
    import tensorflow as tf

    class Strings(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def predict(self, text: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"length": tf.cast(tf.strings.length(text), tf.int64), "upper_bytes": tf.strings.upper(text)}

    module = Strings()
    tf.saved_model.save(module, str(export_dir), signatures={"serving_default": module.predict})


def build_demo_models(out_dir: Path) -> None:
    """Builds every demo model into out_dir, which should be empty or absent."""
    builds = [
        ("half_plus_two", 1, lambda d: _build_half_plus_two(d, b=2.0, c=3.0)),
        ("half_plus_two", 2, lambda d: _build_half_plus_two(d, b=3.0, c=4.0)),
        ("half_plus_two_tf1", 123, _build_half_plus_two_tf1),
        ("mlp", 1, _build_mlp),
        ("strings", 1, _build_strings),
    ]
    for name, version, build in builds:
        print(f"building {name} v{version} …", file=sys.stderr, flush=True)
        model_dir = out_dir / name
        model_dir.mkdir(parents=True, exist_ok=True)
        build(model_dir / str(version))


def demo_models_dir() -> Path:
    """Cache path keyed by this file's hash, so a changed builder never serves stale models."""
    cache = Path(os.environ.get("TFGATE_CACHE_DIR") or Path.home() / ".cache" / "tfgate").expanduser()
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    return cache / "demo-models" / digest


def _publish(final: Path, force: bool) -> Path:
    """Builds into a temporary sibling under a lock, then renames it into place."""
    if final.is_dir() and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if final.is_dir() and not force:
            return final  # another process built it while we waited
        staging = Path(tempfile.mkdtemp(prefix=f"{final.name}.building-", dir=final.parent))
        try:
            build_demo_models(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the models from a server running as another user
        if final.exists():  # only with force: rename cannot replace a non-empty directory
            retired = Path(tempfile.mkdtemp(prefix=f"{final.name}.old-", dir=final.parent))
            os.rename(final, retired / final.name)
            shutil.rmtree(retired)
        os.rename(staging, final)
    return final


def ensure_demo_models() -> Path:
    """Returns the cached demo model directory, building it first if absent."""
    return _publish(demo_models_dir(), force=False)


def main(argv: list[str] | None = None) -> None:
    """CLI: build (or find) the models and print the directory, for scripts and the quick start."""
    parser = argparse.ArgumentParser(prog="python -m backend.demo_models", description="Build the tfgate demo SavedModels.")
    parser.add_argument("--out", type=Path, help="build here instead of the cache directory")
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory already exists")
    args = parser.parse_args(argv)
    print(_publish(args.out or demo_models_dir(), force=args.force))


if __name__ == "__main__":
    main()
