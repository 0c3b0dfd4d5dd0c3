"""TF Serving's JSON tensor encoding, tested directly on the conversion functions."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.example import example_pb2

from backend.errors import InvalidArgument
from backend.examples import serialized_examples_from_json
from backend.servable import TensorSpec
from backend.tensors import (
    decode_json_object,
    parse_predict_inputs,
    predict_response,
    to_array,
)

FLOAT_ROWS = TensorSpec(tf.float32, (-1, 2))
ANY_FLOAT = TensorSpec(tf.float32, None)


def test_row_and_column_formats() -> None:
    inputs = {"a": FLOAT_ROWS, "b": TensorSpec(tf.int64, (-1,))}
    rows, row_format = parse_predict_inputs({"instances": [{"a": [1, 2], "b": 3}, {"a": [4, 5], "b": 6}]}, inputs)
    assert row_format and rows["a"].dtype == np.float32 and rows["a"].shape == (2, 2)
    assert rows["b"].tolist() == [3, 6] and rows["b"].dtype == np.int64
    columns, row_format = parse_predict_inputs({"inputs": {"a": [[1, 2]], "b": [7]}}, inputs)
    assert not row_format and columns["b"].tolist() == [7]


@pytest.mark.parametrize("value, spec, message", [
    ([1.5], TensorSpec(tf.int32, None), "not of expected type: int32"),
    ([True], ANY_FLOAT, "not of expected type: float32"),
    (["a"], ANY_FLOAT, "holds a string"),
    ([[1], [2, 3]], ANY_FLOAT, "same shape"),
    ([300], TensorSpec(tf.uint8, None), "out of range"),
    ([None], ANY_FLOAT, "null or an object"),
    ([1], TensorSpec(tf.string, None), "expected type: string"),
    ([["a"], ["b", "c"]], TensorSpec(tf.string, None), "same shape"),
    ([{"b64": "%%%"}], TensorSpec(tf.string, None), "base64 decode"),
])
def test_bad_values_are_invalid_arguments(value: object, spec: TensorSpec, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        to_array(value, spec, "x")


def test_strings_and_b64_become_bytes() -> None:
    array = to_array([["a", {"b64": "AP8="}]], TensorSpec(tf.string, None), "s")
    assert array.shape == (1, 2) and array.tolist() == [[b"a", b"\x00\xff"]]
    assert to_array({"b64": "YQ=="}, TensorSpec(tf.string, None), "s").tolist() == b"a"
    assert to_array([{"b64": "-_8="}], TensorSpec(tf.string, None), "s").tolist() == [b"\xfb\xff"]  # URL-safe


def test_responses_mirror_the_request_format() -> None:
    one = {"y": np.array([0.1, 2.5], np.float32)}
    assert predict_response(one, True) == b'{"predictions":[0.1,2.5]}'
    assert predict_response(one, False) == b'{"outputs":[0.1,2.5]}'
    two = {"p": np.array([[0.5], [0.25]], np.float32), "k": np.array([1, 2], np.int64)}
    assert predict_response(two, True) == b'{"predictions":[{"p":[0.5],"k":1},{"p":[0.25],"k":2}]}'
    assert predict_response(two, False) == b'{"outputs":{"p":[[0.5],[0.25]],"k":[1,2]}}'
    text = {"name": np.array([b"hi"], object), "raw_bytes": np.array([b"hi"], object)}
    assert predict_response(text, True) == b'{"predictions":[{"name":"hi","raw_bytes":{"b64":"aGk="}}]}'


def test_non_finite_floats_use_tf_serving_tokens() -> None:
    values = {"y": np.array([np.nan, np.inf, -np.inf, 0.1], np.float32)}
    assert predict_response(values, False) == b'{"outputs":[NaN,Infinity,-Infinity,0.1]}'
    assert predict_response(values, True) == b'{"predictions":[NaN,Infinity,-Infinity,0.1]}'
    two = {"p": np.array([[np.nan], [0.5]], np.float64), "k": np.array([1, 2], np.int64)}
    assert predict_response(two, True) == b'{"predictions":[{"p":[NaN],"k":1},{"p":[0.5],"k":2}]}'
    # "null" written for another reason (a name, a string) is not taken for a non-finite number
    named = {"nullable": np.array([0.5], np.float32), "note": np.array([b"null"], object)}
    assert predict_response(named, True) == b'{"predictions":[{"nullable":0.5,"note":"null"}]}'
    assert decode_json_object(b'{"instances": [NaN, -Infinity]}')["instances"][1] == float("-inf")


def test_row_format_needs_a_common_batch_size() -> None:
    with pytest.raises(InvalidArgument, match="inconsistent batch size"):
        predict_response({"a": np.zeros(2), "b": np.zeros(3)}, True)


def test_examples_json_with_context() -> None:
    (first,) = serialized_examples_from_json({"context": {"c": "ctx", "x": 1}, "examples": [{"x": [2.5, 3]}]})
    example = example_pb2.Example.FromString(first)
    assert example.features.feature["c"].bytes_list.value == [b"ctx"]
    assert list(example.features.feature["x"].float_list.value) == [2.5, 3.0]  # the example's own x wins
    (ints,) = serialized_examples_from_json({"examples": [{"n": [1, 2]}]})
    assert list(example_pb2.Example.FromString(ints).features.feature["n"].int64_list.value) == [1, 2]


@pytest.mark.parametrize("request_body, message", [
    ({"examples": []}, "empty"),
    ({}, "'examples' key missing"),
    ({"examples": [{"x": []}]}, "empty list"),
    ({"examples": [{"x": [1, "a"]}]}, "one kind"),
    ({"examples": [{"x": True}]}, "one kind"),
    ({"examples": [[1]]}, "JSON object"),
])
def test_bad_examples(request_body: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        serialized_examples_from_json(request_body)
