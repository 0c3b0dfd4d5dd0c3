"""The common predict body — one numeric array under `instances` or `inputs` — parsed with simdjson straight into a
NumPy buffer, without a Python object per number.

Why: orjson makes a Python float per element and `np.asarray` walks them again: ~80 µs for one 784-float row and
~600 µs for eight, all of it holding the GIL the event loop and TensorFlow's threads need. simdjson copies the numbers
into one buffer in about half that.

What it guarantees: the array it returns is what the general path (backend/tensors.py) builds from the same body
(integers past 2**53 in a float input round through a double first, as TF Serving's own parser does), or it declines
(None) and the caller takes the general path, which also makes every error message. It declines
anything else: other keys, objects or strings among the values, NaN/Infinity tokens, empty or ragged arrays.
Ragged arrays: simdjson flattens nested arrays without checking them, so the shape is read from the first element at
each level and checked against every array above the numbers; a number replaced by a list ([[1, 2], [3, [4]]]) is
caught by counting brackets, since a regular array of that shape has exactly 1 + d0 + d0·d1 + … of them and nothing
else in the body (string values excepted, which only add some) can lower the count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import simdjson

from backend.tensors import numeric_array

# The buffer type simdjson fills for each NumPy kind: doubles for floats, int64 for integers (then cast and
# range-checked by the caller, as the general path does).
_BUFFER_TYPES = {"f": ("d", np.float64), "i": ("i", np.int64), "u": ("i", np.int64)}
_FORMATS = ("instances", "inputs")


@dataclass(slots=True, init=False)  # see backend/inference.py's ModelCall
class NumericRequest:
    signature_name: str
    inputs: dict[str, np.ndarray]  # the signature's one input, in its dtype
    row_format: bool  # `instances`, not `inputs`

    def __init__(self, signature_name: str, inputs: dict[str, np.ndarray], row_format: bool) -> None:
        self.signature_name, self.inputs, self.row_format = signature_name, inputs, row_format


# The signature's only input and its NumPy dtype (kind f, i or u), for a signature name; None when it has several or
# a non-number.
InputOf = Callable[[str], tuple[str, np.dtype] | None]


class _Parsers:
    """The simdjson parser, reused across documents. One for every thread: pysimdjson holds the GIL for a whole
    parse, and refuses (RuntimeError) to parse again while a proxy into its last document is alive, say on another
    thread still reading its own body, which then gets a new parser (_parse). Not a threading.local: mypyc compiles
    the attribute of a subclass into the object itself, shared by all threads, and Python code reading it through
    threading.local's accessor crashes the process."""

    def __init__(self) -> None:
        self.parser = simdjson.Parser()


_parsers = _Parsers()


def parse_numeric_request(body: bytes, input_of: InputOf) -> NumericRequest | None:
    """The request, when it is one numeric array for a signature with one numeric input; otherwise None. Raises
    what `input_of` raises (an unknown signature), or InvalidArgument for an integer out of the input's range."""
    try:
        document = _parse(body)
    except (ValueError, RuntimeError):
        return None
    try:
        return _numeric_request(body, document, input_of)
    except (TypeError, ValueError, RuntimeError):  # a value simdjson cannot put in the buffer: a string, null, ...
        return None
    finally:
        del document  # the parser can take the next body only once no proxy into this one is alive


def _parse(body: bytes) -> object:
    try:
        return _parsers.parser.parse(body)
    except RuntimeError:  # a proxy into its last document is still alive (say, in an error's traceback): a new one
        _parsers.parser = simdjson.Parser()
        return _parsers.parser.parse(body)


def _numeric_request(body: bytes, document: object, input_of: InputOf) -> NumericRequest | None:
    if not isinstance(document, simdjson.Object):
        return None
    keys = set(document.keys())  # a Python set: simdjson's own `in` and `get` cost microseconds when a key is missing
    signature_name = document["signature_name"] if "signature_name" in keys else ""
    found = [key for key in _FORMATS if key in keys]
    if len(found) != 1 or not keys <= {found[0], "signature_name"} or not isinstance(signature_name, str):
        return None
    values = document[found[0]]
    if not isinstance(values, simdjson.Array):
        return None
    shape, brackets = _regular_shape(values)
    # bytes.replace finds bytes with memchr: ~20× faster than bytes.count, whose one-byte loop cost ~10 µs a row
    if shape is None or len(body) - len(body.replace(b"[", b"")) != brackets:
        return None
    only_input = input_of(signature_name)
    if only_input is None:
        return None
    name, np_dtype = only_input
    buffer_type, buffer_dtype = _BUFFER_TYPES[np_dtype.kind]  # input_of gives numeric kinds only
    flat = np.frombuffer(values.as_buffer(of_type=buffer_type), dtype=buffer_dtype)
    if flat.size != math.prod(shape):
        return None
    return NumericRequest(signature_name, {name: numeric_array(flat.reshape(shape), np_dtype, name)},
                          found[0] == "instances")


def _regular_shape(values: simdjson.Array) -> tuple[tuple[int, ...] | None, int]:
    """The shape of a regular nested array with no empty dimension, and how many brackets it is written with;
    (None, 0) when it is not one."""
    shape: list[int] = []
    level = [values]
    brackets = 0
    while True:
        width = len(level[0])
        if width == 0 or any(not isinstance(array, simdjson.Array) or len(array) != width for array in level):
            return None, 0
        shape.append(width)
        brackets += len(level)
        if not isinstance(level[0][0], simdjson.Array):
            return tuple(shape), brackets
        level = [item for array in level for item in array]
