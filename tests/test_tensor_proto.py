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


def _packed(value: np.ndarray) -> tensor_pb2.TensorProto:
    """`value` in tensor_content whatever its size (make_tensor_proto puts a scalar in the typed field)."""
    proto = tensor_pb2.TensorProto(dtype=tf.as_dtype(value.dtype).as_datatype_enum, tensor_content=value.tobytes())
    for size in value.shape:
        proto.tensor_shape.dim.add(size=size)
    return proto
