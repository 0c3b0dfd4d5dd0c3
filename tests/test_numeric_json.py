"""The simdjson fast path for numeric predict bodies: the same arrays as the general path, or a decline that leaves
the body (and its error message) to the general path."""

from __future__ import annotations

import threading

import numpy as np
import orjson
import pytest
import tensorflow as tf

from backend.errors import InvalidArgument
from backend.numeric_json import parse_numeric_request
from backend.servable import TensorSpec
from backend.tensors import decode_json_object, parse_predict_inputs, single_numeric_input


def _input_of(spec: TensorSpec) -> object:
    return lambda signature_name: single_numeric_input({"x": spec})


def _general(body: bytes, spec: TensorSpec) -> tuple[dict[str, np.ndarray], bool]:
    return parse_predict_inputs(decode_json_object(body), {"x": spec})


@pytest.mark.parametrize("document, spec", [
    ({"instances": [[0.1, 2.5, -3e-7], [1, 2, 3]]}, TensorSpec(tf.float32, (-1, 3))),
    ({"instances": [0.1, 7]}, TensorSpec(tf.float32, (-1,))),
    ({"inputs": [[[1.0], [2.0]], [[3.0], [4.0]]], "signature_name": "serving_default"},
     TensorSpec(tf.float64, None)),
    ({"inputs": 3.5}, TensorSpec(tf.float32, None)),
    ({"instances": [[1, 2], [250, 0]]}, TensorSpec(tf.uint8, (-1, 2))),
    ({"instances": [[-9223372036854775808, 9223372036854775807]]}, TensorSpec(tf.int64, None)),
    ({"instances": [[1.0, 2.0]]}, TensorSpec(tf.float16, None)),
])
def test_the_same_arrays_as_the_general_path(document: dict, spec: TensorSpec) -> None:
    body = orjson.dumps(document)
    fast = parse_numeric_request(body, _input_of(spec))
    if not isinstance(document.get("inputs", document.get("instances")), list):
        assert fast is None  # a bare number: the general path's business
        return
    assert fast is not None
    expected, row_format = _general(body, spec)
    assert fast.row_format == row_format and fast.signature_name == document.get("signature_name", "")
    assert fast.inputs["x"].dtype == expected["x"].dtype and fast.inputs["x"].shape == expected["x"].shape
    np.testing.assert_array_equal(fast.inputs["x"], expected["x"])


def test_random_float_rows_match_bit_for_bit() -> None:
    rng = np.random.default_rng(7)
    spec = TensorSpec(tf.float32, (-1, 784))
    for rows in (1, 8, 33):
        values = (rng.standard_normal((rows, 784)) * 10.0 ** rng.integers(-30, 30, (rows, 784))).tolist()
        body = orjson.dumps({"instances": values})
        fast = parse_numeric_request(body, _input_of(spec))
        assert fast is not None
        assert fast.inputs["x"].tobytes() == _general(body, spec)[0]["x"].tobytes()


FLOATS = TensorSpec(tf.float32, None)


@pytest.mark.parametrize("body, spec", [
    (b'{"instances": [[1, 2], [3]]}', FLOATS),  # ragged
    (b'{"instances": [[1, 2], [3, [4]]]}', FLOATS),  # a number replaced by a list: same count once flattened
    (b'{"instances": [[1, 2], 3]}', FLOATS),
    (b'{"instances": [[1, 2], [3, 4]], "signature_name": "a[b"}', FLOATS),  # brackets in a string: declined, safe
    (b'{"instances": []}', FLOATS),
    (b'{"instances": [[]]}', FLOATS),
    (b'{"instances": [1, null]}', FLOATS),
    (b'{"instances": [1, true]}', FLOATS),
    (b'{"instances": [1, "2"]}', FLOATS),
    (b'{"instances": [NaN, 1]}', FLOATS),  # TF Serving's tokens: orjson's fallback reads them
    (b'{"instances": [1e400]}', FLOATS),
    (b'{"instances": [{"x": [1.0]}]}', FLOATS),  # named inputs
    (b'{"instances": [1.5]}', TensorSpec(tf.int32, None)),  # the general path's type error
    (b'{"instances": [1], "inputs": [1]}', FLOATS),
    (b'{"instances": [1], "extra": 1}', FLOATS),
    (b'{"instances": [1], "signature_name": 3}', FLOATS),
    (b'[1, 2]', FLOATS),
    (b'{"instances": [1, 2]', FLOATS),  # malformed
    (b'{"instances": [true]}', TensorSpec(tf.bool, None)),
    (b'{"instances": ["a"]}', TensorSpec(tf.string, None)),
])
def test_declines_what_only_the_general_path_handles(body: bytes, spec: TensorSpec) -> None:
    assert parse_numeric_request(body, _input_of(spec)) is None


def test_signatures_with_several_inputs_are_declined() -> None:
    inputs = {"a": FLOATS, "b": FLOATS}
    assert parse_numeric_request(b'{"instances": [1.0]}', lambda name: single_numeric_input(inputs)) is None


def test_an_integer_out_of_range_is_the_same_error() -> None:
    with pytest.raises(InvalidArgument, match="out of range for uint8"):
        parse_numeric_request(b'{"instances": [300]}', _input_of(TensorSpec(tf.uint8, None)))


def test_a_kept_error_does_not_block_the_next_body() -> None:
    """An error's traceback keeps the parser's last document alive, which simdjson's parser refuses to reuse."""
    with pytest.raises(InvalidArgument) as kept:
        parse_numeric_request(b'{"instances": [300]}', _input_of(TensorSpec(tf.uint8, None)))
    fast = parse_numeric_request(b'{"instances": [3]}', _input_of(TensorSpec(tf.uint8, None)))
    assert kept.value is not None and fast is not None and fast.inputs["x"].tolist() == [3]


def test_an_unknown_signature_raises_what_the_lookup_raises() -> None:
    def unknown(name: str) -> None:
        raise InvalidArgument(f'Serving signature name: "{name}" not found in signature def')

    with pytest.raises(InvalidArgument, match='"nope" not found'):
        parse_numeric_request(b'{"instances": [1.0], "signature_name": "nope"}', unknown)


def test_threads_parse_at_once() -> None:
    """Each thread has its own parser: bodies decoded on the executor never share one."""
    bodies = [orjson.dumps({"instances": [[float(i)] * 50] * 20}) for i in range(4)]
    failures: list[str] = []

    def parse(index: int) -> None:
        for _ in range(200):
            fast = parse_numeric_request(bodies[index], _input_of(FLOATS))
            if fast is None or float(fast.inputs["x"][0, 0]) != index:
                failures.append(f"thread {index}")
                return

    threads = [threading.Thread(target=parse, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
