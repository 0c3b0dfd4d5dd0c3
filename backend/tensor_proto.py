"""TensorProto ⇄ NumPy for the gRPC API, as TF Serving encodes tensors.

Requests may carry values in `tensor_content` (packed bytes) or in the typed `*_val` fields: packed numbers are read
in place, everything else decodes through TensorFlow's own `make_ndarray`. Responses use the typed fields, as TF
Serving does by default, or `tensor_content` when the server runs with `--enable_serialization_as_tensor_content`
(cheaper to encode and decode for big tensors).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from backend.errors import InvalidArgument
from backend.servable import TensorSpec

# The typed field each dtype's values go to (TF Serving's default encoding); other dtypes use tensor_content.
_TYPED_FIELD: dict[int, str] = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_INT16: "int_val",
    types_pb2.DT_INT8: "int_val",
    types_pb2.DT_UINT8: "int_val",
    types_pb2.DT_UINT16: "int_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_UINT32: "uint32_val",
    types_pb2.DT_UINT64: "uint64_val",
    types_pb2.DT_BOOL: "bool_val",
}


def to_ndarray(name: str, proto: tensor_pb2.TensorProto, spec: TensorSpec) -> np.ndarray:
    """The request tensor as an array, after checking its dtype against the signature's."""
    if proto.dtype != spec.dtype.as_datatype_enum:
        got = types_pb2.DataType.Name(proto.dtype) if proto.dtype in types_pb2.DataType.values() else proto.dtype
        raise InvalidArgument(f"Expects arg[{name}] to be {spec.dtype.name} but {got} is provided")
    if proto.tensor_content and spec.numeric is not None:
        return _packed(name, proto, spec.numeric)
    if not proto.tensor_content:
        _check_repetition(name, proto, spec)
    try:
        return tf.make_ndarray(proto)
    except (TypeError, ValueError) as error:
        raise InvalidArgument(f"input '{name}' is not a valid TensorProto: {error}") from None


# TensorFlow fills a tensor given fewer typed values than its shape holds by repeating the last one (zeros when there
# is none), so a request of a few bytes could make the server allocate gigabytes, and then run the model on them: 35
# bytes asking for 100,000 × 784 floats took 1.5 GB and 5 s of one backend. Such a filled tensor may hold at most
# this much (at 64 MiB a 41-byte request still cost 850 MB, since an answer's typed values are encoded from Python
# floats); a tensor that carries all its values is bounded by the message size instead, as in TF Serving.
MAX_REPEATED_TENSOR_BYTES = 8 * 1024 * 1024
# What one repeated string costs besides its bytes: a reference in make_ndarray's list and in its object array, then
# TensorFlow's tstring. Without it a 1-byte string counted 1 byte: 40 bytes asking for 60 million "a" took 6 GB and
# minutes of one backend, long enough for the gateway to mark it unhealthy.
STRING_ELEMENT_OVERHEAD_BYTES = 40

# The typed field make_ndarray reads each dtype's values from (it ignores the others), and how many of its numbers
# make one element.
_VALUES_FIELD: dict[int, tuple[str, int]] = {
    **{dtype: (field, 1) for dtype, field in _TYPED_FIELD.items()},
    types_pb2.DT_STRING: ("string_val", 1),
    types_pb2.DT_HALF: ("half_val", 1),
    types_pb2.DT_BFLOAT16: ("half_val", 1),
    types_pb2.DT_COMPLEX64: ("scomplex_val", 2),
    types_pb2.DT_COMPLEX128: ("dcomplex_val", 2),
}


def _check_repetition(name: str, proto: tensor_pb2.TensorProto, spec: TensorSpec) -> None:
    """Refuse, with a message that says why, the typed values make_ndarray would fail on with NumPy's words ("index
    can't contain negative values") or would repeat past MAX_REPEATED_TENSOR_BYTES."""
    shape = [dim.size for dim in proto.tensor_shape.dim]
    if min(shape, default=0) < 0:
        raise InvalidArgument(f"input '{name}' is not a valid TensorProto: shape {shape} has a negative size")
    elements = math.prod(shape)
    field, per_element = _VALUES_FIELD.get(proto.dtype, ("", 1))
    typed = getattr(proto, field) if field else ()
    values = len(typed) // per_element
    if values > elements:
        raise InvalidArgument(f"input '{name}' is not a valid TensorProto: {values} values in {field} for shape "
                              f"{shape} of {elements} elements")
    element_bytes = max(1, spec.dtype.size)
    if field == _STRING_FIELD:
        element_bytes = (len(typed[-1]) if typed else 0) + STRING_ELEMENT_OVERHEAD_BYTES
    if values < elements and elements * element_bytes > MAX_REPEATED_TENSOR_BYTES:
        raise InvalidArgument(f"input '{name}' gives {values} values for {elements} elements: TensorFlow would "
                              f"repeat the last one to more than {MAX_REPEATED_TENSOR_BYTES} bytes, tfgate's limit; "
                              "send every value (tensor_content is the compact way)")


def _packed(name: str, proto: tensor_pb2.TensorProto, dtype: np.dtype) -> np.ndarray:
    """Numbers in `tensor_content` (what `tf.make_tensor_proto` and the official clients send), read in place.
    make_ndarray gives the same array but copies it and costs ~14 µs more a call (20.1 against 6.5 µs for one or
    eight rows of the demo MLP): a gRPC predict's decode runs on the event loop. The array is read-only, as the
    REST path's already are; the model call and the batcher only read inputs."""
    shape = tuple(dim.size for dim in proto.tensor_shape.dim)
    content = proto.tensor_content
    if min(shape, default=0) < 0 or len(content) != math.prod(shape) * dtype.itemsize:
        raise InvalidArgument(f"input '{name}' is not a valid TensorProto: {len(content)} bytes of tensor_content "
                              f"for shape {list(shape)} of {dtype.name} ({dtype.itemsize} bytes each)")
    return np.frombuffer(content, dtype=dtype).reshape(shape)


def fill_tensor_proto(proto: tensor_pb2.TensorProto, array: np.ndarray, as_tensor_content: bool) -> None:
    """Write `array` into `proto`, an empty message (a response's output entry): filled in place rather than built
    and copied in, with the dtype's encoding looked up once per dtype, since a gRPC predict encodes its answer on the
    event loop."""
    dtype_enum, field = _encoding(array.dtype)
    proto.dtype = dtype_enum
    dims = proto.tensor_shape.dim
    for size in array.shape:
        dims.add(size=size)
    if field == _STRING_FIELD:
        proto.string_val.extend(array.reshape(-1).tolist())
    elif as_tensor_content or field is None:
        proto.tensor_content = np.ascontiguousarray(array).tobytes()
    else:
        getattr(proto, field).extend(array.reshape(-1).tolist())


_STRING_FIELD = "string_val"


def _encoding_of(dtype: np.dtype) -> tuple[int, str | None]:
    """A NumPy dtype's TensorFlow DataType and the typed field its values go to (None: tensor_content only)."""
    tf_dtype = tf.dtypes.as_dtype(tf.string if dtype == object else dtype)
    field = _STRING_FIELD if tf_dtype == tf.string else _TYPED_FIELD.get(tf_dtype.as_datatype_enum)
    return tf_dtype.as_datatype_enum, field


# Worked out once for the dtypes models answer with: TensorFlow's as_dtype and DType comparisons cost ~2 µs a call.
_ENCODINGS: Mapping[np.dtype, tuple[int, str | None]] = MappingProxyType({
    np.dtype(name): _encoding_of(np.dtype(name))
    for name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                 "uint64", "bool", "complex64", "complex128", "object")})


def _encoding(dtype: np.dtype) -> tuple[int, str | None]:
    return _ENCODINGS.get(dtype) or _encoding_of(dtype)
