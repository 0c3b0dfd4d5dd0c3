"""The REST predict call without the network: the same backend functions, called in this process.

`predict_call` is the bare core (NumPy in, NumPy out): the ceiling for any server built on it. `json_predict_call`
wraps it in exactly the steps the REST handler runs on each body (`backend.rest._predict`), so comparing the two
with a REST run splits the cost into JSON and HTTP. Importing this module imports TensorFlow.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from backend import inference
from backend.servable import DEFAULT_SIGNATURE, Servable
from backend.tensors import decode_json_object, parse_predict_inputs, predict_response


def predict_call(servable: Servable, inputs: dict[str, np.ndarray],
                 check: Callable[[dict[str, np.ndarray]], None]) -> Callable[[], None]:
    def call() -> None:
        check(inference.predict(servable, DEFAULT_SIGNATURE, inputs))

    return call


def json_predict_call(servable: Servable, body: bytes, check: Callable[[bytes], None]) -> Callable[[], None]:
    def call() -> None:
        request = decode_json_object(body)
        signature = servable.signature(DEFAULT_SIGNATURE)
        inputs, row_format = parse_predict_inputs(request, signature.inputs)
        check(predict_response(inference.predict(servable, DEFAULT_SIGNATURE, inputs), row_format))

    return call
