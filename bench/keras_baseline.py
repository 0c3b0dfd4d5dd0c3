"""The baseline a tfgate backend is measured against: the model server people typically write by hand.

`python -m bench.keras_baseline --model_base_path=DIR/mlp --rest_api_port=P` rebuilds the demo `mlp` (Dense
layers: ReLU hidden, softmax out) as a Keras model with the SavedModel's own weights, then serves TF Serving's
REST predict path, `POST /v1/models/NAME:predict` with `{"instances": [...]}`, the usual way: aiohttp's
`request.json()`, `model.predict(np.array(instances))` on each request, right in the handler, and
`web.json_response` with the same row-format answer as TF Serving's (`probabilities` and `class_id` per row).
Nothing here is tuned; that is the point. It opens its port only after the model is built, so a connection means
ready, and stops on SIGTERM (aiohttp's run_app).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from aiohttp import web


def latest_version(base_path: Path) -> Path:
    versions = [child for child in base_path.iterdir() if child.name.isdigit()]
    if not versions:
        raise SystemExit(f"no numeric version directory under {base_path}")
    return max(versions, key=lambda child: int(child.name))


def build_model(version_dir: Path):  # type: ignore[no-untyped-def]  # -> keras.Model (import is deferred)
    """The demo mlp as a Keras Sequential, holding the weights of the SavedModel in `version_dir`."""
    import keras
    import tensorflow as tf

    layers = tf.saved_model.load(str(version_dir)).layers  # [(kernel, bias), ...] as the demo model tracks them
    weights = [variable.numpy() for layer in layers for variable in layer]
    kernels = weights[::2]
    model = keras.Sequential([keras.Input((kernels[0].shape[0],))]
                             + [keras.layers.Dense(kernel.shape[1], activation="relu") for kernel in kernels[:-1]]
                             + [keras.layers.Dense(kernels[-1].shape[1], activation="softmax")])
    model.set_weights(weights)
    return model


def make_app(model, name: str) -> web.Application:  # type: ignore[no-untyped-def]
    async def predict(request: web.Request) -> web.Response:
        body = await request.json()
        probabilities = model.predict(np.array(body["instances"], dtype=np.float32), verbose=0)
        return web.json_response({"predictions": [{"probabilities": row.tolist(), "class_id": int(row.argmax())}
                                                  for row in probabilities]})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post(f"/v1/models/{name}:predict", predict)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.keras_baseline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_base_path", type=Path, required=True, help="the demo mlp's base path")
    parser.add_argument("--model_name", default="mlp")
    parser.add_argument("--rest_api_port", type=int, required=True)
    parser.add_argument("--bind_address", default="127.0.0.1")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    model = build_model(latest_version(args.model_base_path))
    web.run_app(make_app(model, args.model_name), host=args.bind_address, port=args.rest_api_port)


if __name__ == "__main__":
    main()
