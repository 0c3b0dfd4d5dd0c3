"""Request tensors from TensorProtos: packed numbers are read in place and must equal what TensorFlow's own
make_ndarray gives; a tensor_content that does not fit its shape is INVALID_ARGUMENT. Response tensors: whatever
the dtype and encoding, make_ndarray reads back the array that was written."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2

from backend.errors import InvalidArgument
from backend.servable import TensorSpec
from backend.tensor_proto import fill_tensor_proto, to_ndarray


@pytest.mark.parametrize("value", [
    np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    np.arange(-6, 6, dtype=np.int64).reshape(2, 3, 2),
    np.array([1.5, -2.25], dtype=np.float64),
    np.arange(10, dtype=np.uint8),
    np.array(3.5, dtype=np.float16),  # a scalar
    np.zeros((0, 3), dtype=np.int32),  # no rows
])
def test_packed_numbers_decode_as_make_ndarray_does(value: np.ndarray) -> None:
    proto = _packed(value)
    decoded = to_ndarray("x", proto, TensorSpec(tf.as_dtype(value.dtype), None))
    expected = tf.make_ndarray(proto)
    assert decoded.dtype == expected.dtype and decoded.shape == expected.shape
    np.testing.assert_array_equal(decoded, expected)


@pytest.mark.parametrize("content, dims", [
    (np.arange(5, dtype=np.float32).tobytes(), [2, 3]),  # too few numbers
    (np.arange(7, dtype=np.float32).tobytes(), [2, 3]),  # too many
    (np.arange(6, dtype=np.float32).tobytes()[:-1], [6]),  # not whole numbers
    (np.arange(6, dtype=np.float32).tobytes(), [-2, -3]),  # negative sizes
])
def test_tensor_content_that_does_not_fit_its_shape_is_invalid(content: bytes, dims: list[int]) -> None:
    proto = _packed(np.zeros(1, np.float32))
    proto.tensor_content = content
    del proto.tensor_shape.dim[:]
    for size in dims:
        proto.tensor_shape.dim.add(size=size)
    with pytest.raises(InvalidArgument, match="input 'x' is not a valid TensorProto: .* bytes of tensor_content"):
        to_ndarray("x", proto, TensorSpec(tf.float32, None))


@pytest.mark.parametrize("as_tensor_content", [False, True])
@pytest.mark.parametrize("value", [
    np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    np.arange(-6, 6, dtype=np.int64).reshape(2, 3, 2),
    np.array([1.5, -2.25], dtype=np.float64),
    np.arange(10, dtype=np.uint16),
    np.array([True, False]),
    np.array(3.5, dtype=np.float16),  # a scalar, and a dtype without a typed field here: tensor_content
    np.array([1 + 2j], dtype=np.complex64),  # no typed field either
    np.zeros((0, 3), dtype=np.int32),  # no rows
    np.array([[b"a", b"bc"], [b"", b"\xff"]], dtype=object),  # strings: always string_val
])
def test_an_output_reads_back_as_the_array_written(value: np.ndarray, as_tensor_content: bool) -> None:
    proto = tensor_pb2.TensorProto()
    fill_tensor_proto(proto, value, as_tensor_content)
    decoded = tf.make_ndarray(proto)
    assert decoded.shape == value.shape and (decoded.dtype == value.dtype or value.dtype == object)
    np.testing.assert_array_equal(decoded, value)
    assert bool(proto.tensor_content) == (as_tensor_content and value.dtype != object and value.size > 0
                                          or value.dtype in (np.float16, np.complex64) and value.size > 0)


def test_a_few_values_may_not_fill_a_huge_tensor() -> None:
    """TensorFlow repeats the last typed value to fill the shape: a tiny request must not make the server allocate
    gigabytes; a small fill, and a tensor that carries all its values, decode as make_ndarray decodes them."""
    huge = tensor_pb2.TensorProto(dtype=tf.float32.as_datatype_enum, float_val=[1.0])
    for size in (100_000, 784):
        huge.tensor_shape.dim.add(size=size)
    with pytest.raises(InvalidArgument, match=r"input 'x' gives 1 values for 78400000 elements: .* more than 8388608"):
        to_ndarray("x", huge, TensorSpec(tf.float32, None))
    strings = tf.make_tensor_proto([b"a"], dtype=tf.string)
    strings.tensor_shape.dim[0].size = 10**9
    with pytest.raises(InvalidArgument, match="gives 1 values for 1000000000 elements"):
        to_ndarray("s", strings, TensorSpec(tf.string, None))
    small = tf.make_tensor_proto([2.5], dtype=tf.float32)
    small.tensor_shape.dim[0].size = 1000
    np.testing.assert_array_equal(to_ndarray("x", small, TensorSpec(tf.float32, None)), np.full(1000, 2.5, np.float32))
    elements = 8_400_000  # 67.2 MB decoded, past the limit, but every value is sent
    whole = tensor_pb2.TensorProto(dtype=tf.float64.as_datatype_enum, double_val=np.full(elements, 0.5))
    whole.tensor_shape.dim.add(size=elements)
    assert to_ndarray("d", whole, TensorSpec(tf.float64, None)).shape == (elements,)


def test_repeated_strings_count_their_bytes_and_overhead() -> None:
    """A string counted one byte against the limit: one "a" for 60 million elements took 6 GB of the backend, one
    1000-byte string for a million elements made a 1 GB tensor."""
    for value, elements in ((b"a", 60_000_000), (b"x" * 1000, 1_000_000)):
        strings = tensor_pb2.TensorProto(dtype=tf.string.as_datatype_enum, string_val=[value])
        strings.tensor_shape.dim.add(size=elements)
        with pytest.raises(InvalidArgument, match=f"gives 1 values for {elements} elements"):
            to_ndarray("s", strings, TensorSpec(tf.string, None))
    small = tensor_pb2.TensorProto(dtype=tf.string.as_datatype_enum, string_val=[b"a", b"bc"])
    small.tensor_shape.dim.add(size=1000)
    assert to_ndarray("s", small, TensorSpec(tf.string, None)).tolist() == [b"a"] + [b"bc"] * 999


@pytest.mark.parametrize("proto, message", [
    (tensor_pb2.TensorProto(dtype=tf.float32.as_datatype_enum, float_val=[1.0, 2.0, 3.0],
                            tensor_shape={"dim": [{"size": 2}]}),
     r"3 values in float_val for shape \[2\] of 2 elements"),
    (tensor_pb2.TensorProto(dtype=tf.float32.as_datatype_enum, float_val=[1.0, 2.0]),  # no shape: a scalar
     r"2 values in float_val for shape \[\] of 1 elements"),
    (tensor_pb2.TensorProto(dtype=tf.string.as_datatype_enum, string_val=[b"a"], tensor_shape={"dim": [{"size": 0}]}),
     r"1 values in string_val for shape \[0\] of 0 elements"),
    (tensor_pb2.TensorProto(dtype=tf.float32.as_datatype_enum, float_val=[1.0], tensor_shape={"dim": [{"size": -1}]}),
     r"shape \[-1\] has a negative size"),
    (tensor_pb2.TensorProto(dtype=tf.complex64.as_datatype_enum, scomplex_val=[1, 2, 3, 4],
                            tensor_shape={"dim": [{"size": 1}]}), r"2 values in scomplex_val for shape \[1\]"),
])
def test_typed_values_that_do_not_fit_the_shape_say_so(proto: tensor_pb2.TensorProto, message: str) -> None:
    """make_ndarray fails on these with NumPy's words ("index can't contain negative values", "cannot reshape")."""
    spec = TensorSpec(tf.as_dtype(proto.dtype), None)
    with pytest.raises(InvalidArgument, match=f"input 'x' is not a valid TensorProto: {message}"):
        to_ndarray("x", proto, spec)


def _packed(value: np.ndarray) -> tensor_pb2.TensorProto:
    """`value` in tensor_content whatever its size (make_tensor_proto puts a scalar in the typed field)."""
    proto = tensor_pb2.TensorProto(dtype=tf.as_dtype(value.dtype).as_datatype_enum, tensor_content=value.tobytes())
    for size in value.shape:
        proto.tensor_shape.dim.add(size=size)
    return proto
