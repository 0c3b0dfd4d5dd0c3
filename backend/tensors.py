"""TF Serving's JSON tensor encoding (its `util/json_tensor.cc`), to and from NumPy.

Requests: `instances` (row format: a list, one entry per example, objects for named inputs) or `inputs` (columnar:
one value, or an object of named values); `{"b64": "..."}` for binary strings; `NaN`/`Infinity` tokens. Values are
checked against the signature's dtype and shape before TensorFlow sees them, so a bad request gets a message naming
the input instead of a TensorFlow stack. Responses mirror the request's format: `predictions` for rows (a bare list
for one output), `outputs` for columns; outputs whose name ends in `_bytes` are base64 objects; float32 prints in
its shortest form (0.1, not 0.10000000149011612).

Decoding and encoding run through orjson and NumPy's C loops; only string tensors and the rare non-finite float
output take a per-element Python path.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
from collections.abc import Iterable
from typing import Any, Mapping

import numpy as np
import orjson
import tensorflow as tf

from backend.errors import InvalidArgument
from backend.inference import check_input_names
from backend.servable import TensorSpec

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
_URL_SAFE_TO_STANDARD = str.maketrans("-_", "+/")


def decode_json_object(body: bytes) -> dict[str, Any]:
    """Parse a request body; TF Serving also accepts the NaN/Infinity/-Infinity tokens, so a second parser does."""
    if not body.strip():
        raise InvalidArgument("JSON Parse error: The document is empty")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as strict_error:
        document = _loads_with_constants(body, strict_error)
    if not isinstance(document, dict):
        raise InvalidArgument("JSON Value is not an object: the request body must be a JSON object")
    return document


def _loads_with_constants(body: bytes, strict_error: orjson.JSONDecodeError) -> Any:
    """The body orjson refused, read by the standard parser, which also takes NaN and Infinity. It takes more than
    TF Serving does, though: lone surrogates ("\\ud800", which RapidJSON refuses, and which no later step can
    encode) and any depth (as recursion). So orjson's refusal stands unless a NaN or Infinity token was what it
    refused, and a document with one still may not hold a lone surrogate."""
    constants: list[str] = []

    def constant(token: str) -> float:
        constants.append(token)
        return float(token)

    try:
        document = json.loads(body, parse_constant=constant)
    except RecursionError:
        raise InvalidArgument(f"JSON Parse error: {strict_error}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"JSON Parse error: {error}") from None
    if not constants:
        raise InvalidArgument(f"JSON Parse error: {strict_error}")
    try:
        orjson.dumps(document)
    except TypeError as error:  # orjson writes NaN as null, so only a string it cannot encode is left
        raise InvalidArgument(f"JSON Parse error: {error}") from None
    return document


def encode_json(document: Mapping[str, Any]) -> bytes:
    return orjson.dumps(document, option=_JSON_OPTIONS)


# ---------------------------------------------------------------------------------------------------------------
# Requests


def parse_predict_inputs(request: Mapping[str, Any],
                         inputs: Mapping[str, TensorSpec]) -> tuple[dict[str, np.ndarray], bool]:
    """The request's tensors by input name (dtypes converted, names and shapes checked later by the core), and
    whether it used the row (`instances`) format."""
    has_instances, has_inputs = "instances" in request, "inputs" in request
    if has_instances == has_inputs:
        if has_instances:
            raise InvalidArgument("Not formatted correctly, expecting only one of 'inputs' or 'instances' keys")
        raise InvalidArgument("Missing 'inputs' or 'instances' key")
    if has_instances:
        tensors = _parse_instances(request["instances"], inputs)
    else:
        tensors = _parse_columns(request["inputs"], inputs)
    return tensors, has_instances


def _is_named(value: Any) -> bool:
    return isinstance(value, dict) and not _is_b64(value)


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and "b64" in value


def _parse_instances(instances: Any, inputs: Mapping[str, TensorSpec]) -> dict[str, np.ndarray]:
    if not isinstance(instances, list):
        raise InvalidArgument("Expecting 'instances' to be an list/array")
    if not instances:
        raise InvalidArgument("'instances' is empty: send at least one instance")
    if not _is_named(instances[0]):
        only = _only_input(inputs, "instances")
        return {only: to_array(instances, inputs[only], only)}
    names = instances[0].keys()
    for index, instance in enumerate(instances):
        if not _is_named(instance):
            raise InvalidArgument(f"instance {index} is not a JSON object: every instance must be, when the first is")
        if instance.keys() != names:
            raise InvalidArgument(f"instance {index} has inputs {sorted(instance)}; instance 0 has {sorted(names)}: "
                                  "every instance must name the same inputs")
    check_input_names(names, inputs.keys())
    return {name: to_array([instance[name] for instance in instances], inputs[name], name) for name in names}


def _parse_columns(columns: Any, inputs: Mapping[str, TensorSpec]) -> dict[str, np.ndarray]:
    if _is_named(columns):
        check_input_names(columns.keys(), inputs.keys())
        return {name: to_array(value, inputs[name], name) for name, value in columns.items()}
    only = _only_input(inputs, "inputs")
    return {only: to_array(columns, inputs[only], only)}


def _only_input(inputs: Mapping[str, TensorSpec], key: str) -> str:
    if len(inputs) != 1:
        raise InvalidArgument(f"The signature has {len(inputs)} inputs ({', '.join(sorted(inputs))}): "
                              f"'{key}' must name each input in a JSON object")
    return next(iter(inputs))


_KIND_OF_DTYPE = {"f": "float", "i": "int", "u": "int", "b": "bool"}
_ACCEPTED_JSON_KINDS = {"float": "if", "int": "i", "bool": "b"}


def to_array(value: Any, spec: TensorSpec, name: str) -> np.ndarray:
    """A JSON value as an array of the signature's dtype; a clear InvalidArgument when it cannot be one."""
    if spec.dtype == tf.string:
        return _string_array(value, name)
    np_dtype = np.dtype(spec.dtype.as_numpy_dtype)
    family = _KIND_OF_DTYPE.get(np_dtype.kind)
    if family is None:
        raise InvalidArgument(f"input '{name}' has dtype {spec.dtype.name}, which the JSON API cannot carry")
    try:
        raw = np.asarray(value)
    except ValueError:
        raise InvalidArgument(f"Expecting tensors in list to be of same shape (input '{name}' is ragged)") from None
    if raw.dtype.kind not in _ACCEPTED_JSON_KINDS[family] or (raw.dtype.kind in "if" and _holds_bool(value, raw.ndim)):
        found = ("a string" if raw.dtype.kind == "U" else "null or an object" if raw.dtype.kind == "O"
                 else raw.dtype if raw.dtype.kind not in "if" else "true or false among its numbers")
        raise InvalidArgument(f"JSON Value: input '{name}' holds {found}, which is not of expected type: "
                              f"{np_dtype.name}")
    return numeric_array(raw, np_dtype, name)


def _holds_bool(value: Any, depth: int) -> bool:
    """Whether a regular JSON array of numbers, `depth` deep, also holds true or false: NumPy reads those as 1 and 0
    when numbers surround them, where TF Serving refuses a boolean for a number."""
    leaves: Iterable[Any] = value if depth else (value,)
    for _ in range(depth - 1):
        leaves = itertools.chain.from_iterable(leaves)
    return bool in set(map(type, leaves))


def single_numeric_input(inputs: Mapping[str, TensorSpec]) -> tuple[str, np.dtype] | None:
    """A signature's only input and its NumPy dtype, when it is a number (not a string, bool or bfloat16)."""
    if len(inputs) != 1:
        return None
    ((name, spec),) = inputs.items()
    return None if spec.numeric is None else (name, spec.numeric)


def numeric_array(raw: np.ndarray, np_dtype: np.dtype, name: str) -> np.ndarray:
    """Parsed JSON numbers (float64 or int64) as the input's numeric dtype; integers must fit it."""
    if np_dtype.kind in "iu" and raw.size:
        limits = np.iinfo(np_dtype)
        if raw.min() < limits.min or raw.max() > limits.max:
            raise InvalidArgument(f"input '{name}' holds a value out of range for {np_dtype.name}")
    return raw.astype(np_dtype, copy=False)


def _string_array(value: Any, name: str) -> np.ndarray:
    leaves = _bytes_leaves(value, name)
    array = np.empty(_nested_shape(leaves), dtype=object)
    try:
        array[...] = leaves
    except ValueError:
        array[...] = None
    if not all(isinstance(item, bytes) for item in array.flat):
        raise InvalidArgument(f"Expecting tensors in list to be of same shape (input '{name}' is ragged)")
    return array


def _nested_shape(value: Any) -> tuple[int, ...]:
    shape: list[int] = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return tuple(shape)


def _bytes_leaves(value: Any, name: str) -> Any:
    if isinstance(value, list):
        return [_bytes_leaves(item, name) for item in value]
    if isinstance(value, str):
        return value.encode()
    if _is_b64(value):
        return decode_b64(value["b64"], name)
    raise InvalidArgument(f"JSON Value: input '{name}' holds {json.dumps(value)[:40]}, which is not of expected "
                          "type: string (a string or a {\"b64\": ...} object)")


def decode_b64(text: Any, name: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidArgument(f"'b64' value of '{name}' must be a string")
    try:  # TF Serving also takes the URL-safe alphabet
        return base64.b64decode(text.translate(_URL_SAFE_TO_STANDARD), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"Unable to base64 decode the value of '{name}'") from None


# ---------------------------------------------------------------------------------------------------------------
# Responses


def predict_response(outputs: Mapping[str, np.ndarray], row_format: bool) -> bytes:
    """The JSON body of a predict response, in the format of the request.

    orjson writes NaN and ±Infinity as null, where TF Serving writes NaN, Infinity and -Infinity: a body without
    "null" in it has none of them, so the arrays are checked for them (np.isfinite, ~3 µs per array) only then."""
    if len(outputs) == 1:  # the common answer, one tensor orjson writes as it is: the general path's steps do nothing
        (array,) = outputs.values()
        if _written_as_is(array) and (array.ndim or not row_format):
            body = encode_json({"predictions" if row_format else "outputs": array})
            if body.find(b"null") < 0:  # find, not `in`: see backend/http_server.py's _request
                return body
    values = {name: _output_value(name, array) for name, array in outputs.items()}
    if row_format:
        document: dict[str, Any] = {"predictions": _rows(values, outputs)}
    elif len(values) == 1:
        document = {"outputs": next(iter(values.values()))}
    else:
        document = {"outputs": values}
    body = encode_json(document)
    if body.find(b"null") >= 0 and any(_needs_slow_path(array) for array in outputs.values()):
        return json.dumps(_plain(document), separators=(",", ":"), allow_nan=True).encode()
    return body


def _rows(values: Mapping[str, Any], outputs: Mapping[str, np.ndarray]) -> Any:
    batch_sizes = {name: (array.shape[0] if array.ndim else None) for name, array in outputs.items()}
    if None in batch_sizes.values():
        scalar = next(name for name, size in batch_sizes.items() if size is None)
        raise InvalidArgument(f"Tensor name: {scalar} has no batch dimension: use the 'inputs' format")
    if len(values) == 1:
        return next(iter(values.values()))
    expected = next(iter(batch_sizes.values()))
    for name, size in batch_sizes.items():
        if size != expected:
            raise InvalidArgument(f"Tensor name: {name} has inconsistent batch size: {size} expecting: {expected}")
    return [{name: value[row] for name, value in values.items()} for row in range(expected or 0)]


def _output_value(name: str, array: np.ndarray) -> Any:
    if array.dtype == object or array.dtype.kind == "S":
        as_b64 = name.endswith("_bytes")
        converted = np.frompyfunc(lambda item: _bytes_json(item, as_b64), 1, 1)(array)
        return np.asarray(converted, dtype=object).tolist()
    if array.dtype.kind == "f" and array.dtype.itemsize < 4:
        return array.astype(np.float32)
    if array.dtype.kind == "c":
        raise InvalidArgument(f"output '{name}' is complex, which the JSON API cannot carry")
    return array


def _bytes_json(item: bytes, as_b64: bool) -> Any:
    if not as_b64:
        try:
            return item.decode()
        except UnicodeDecodeError:
            pass  # not text: send it the only lossless way JSON can carry bytes
    return {"b64": base64.b64encode(item).decode()}


def _written_as_is(array: np.ndarray) -> bool:
    """Numbers orjson writes with no conversion: integers, float32 and float64 (as TF Serving does, but for
    non-finite ones: see predict_response)."""
    kind = array.dtype.kind
    return kind in "iu" or (kind == "f" and array.dtype.itemsize >= 4)


def _needs_slow_path(array: np.ndarray) -> bool:
    return array.dtype.kind == "f" and not bool(np.isfinite(array).all())


def _plain(value: Any) -> Any:
    """The document as plain Python values for the stdlib encoder, which writes NaN/Infinity as TF Serving does."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, (np.ndarray, np.generic)):
        if value.dtype.kind == "f":
            # Through the shortest decimal form, so float32 0.1 prints as 0.1 here too.
            return np.asarray(value).astype(str).astype(np.float64).tolist()
        return _plain(np.asarray(value).tolist())
    return value

