"""The common predict body — one numeric array under `instances` or `inputs` — read by simdjson (C++, in
backend/_json_numbers.cpp) straight into a NumPy buffer, without a Python object per number, and mostly off the
event loop.

Why two steps: reading a body's numbers is most of what a one-row predict costs the event loop (784 floats: ~19 µs of
simdjson, ~13 µs more to check the proxies it returns; 8 rows: eight times that), and the event loop is the one
thread every request needs. So the loop only *scans* the body (`_json_numbers.scan`, ~9 µs a row: its keys, a regular
nested array, numbers at its leaves, none of them converted), which gives the shape that validation and batching need,
and the numbers are *read* (`JsonRows.array`, `_json_numbers.fill`) on the thread that runs the call or its batch,
without the GIL, while the loop goes on with the next request. Integer inputs are read at once: a value out of the
input's range must be the caller's error, not its batch's.

What it guarantees: an input it returns holds what the general path (backend/tensors.py) builds from the same body
(integers past 2**53 in a float input round through a double first, as TF Serving's own parser does), or it declines
(None) and the caller takes the general path, which also makes every error message. It declines anything else: other
keys, objects, strings, booleans or null among the values, NaN/Infinity tokens, empty or ragged arrays, a bare
number. A number the scan let pass but the read cannot (malformed, like `1.2.3`, or beyond a double, like `1e400`)
raises UnreadNumbers when the call runs; the REST adapter then reads the body on the general path, which says why.
Without the C++ extension (TFGATE_PURE_PYTHON=1 builds none) every body takes the general path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from backend.errors import InvalidArgument
from backend.inference import DeferredInput, Input
from backend.tensors import numeric_array

try:
    from backend import _json_numbers  # type: ignore[attr-defined]  # C++, no stub
except ImportError:  # built without compiling (setup.py)
    _json_numbers = None  # type: ignore[assignment]

_FILLED_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))  # what fill() writes as is; other floats via float64


class UnreadNumbers(InvalidArgument):
    """A scanned body holds a number simdjson cannot read: the general path reads the body again, and says why."""


class JsonRows(DeferredInput):
    """A float input still in its request body: its shape and dtype are known, its numbers are read by `array()`."""

    def __init__(self, body: bytes, shape: tuple[int, ...], dtype: np.dtype) -> None:
        super().__init__(shape, dtype)
        self.body = body

    def array(self) -> np.ndarray:
        """The numbers, parsed without holding the GIL; raises UnreadNumbers when one cannot be read."""
        filled = np.empty(self.shape, self.dtype if self.dtype in _FILLED_FLOATS else np.float64)
        if not _json_numbers.fill(self.body, filled):
            raise UnreadNumbers("A number in the request body could not be read")
        return filled.astype(self.dtype, copy=False)


@dataclass(slots=True)  # not frozen: made per request (see backend/inference.py's ModelCall)
class NumericRequest:
    signature_name: str
    inputs: dict[str, Input]  # the signature's one input, in its dtype (floats still to be read: JsonRows)
    row_format: bool  # `instances`, not `inputs`


# The signature's only input and its NumPy dtype (kind f, i or u), for a signature name; None when it has several or
# a non-number.
InputOf = Callable[[str], tuple[str, np.dtype] | None]


def parse_numeric_request(body: bytes, input_of: InputOf) -> NumericRequest | None:
    """The request, when it is one numeric array for a signature with one numeric input; otherwise None. Raises
    what `input_of` raises (an unknown signature), or InvalidArgument for an integer out of the input's range."""
    scanned = _json_numbers.scan(body) if _json_numbers is not None else None
    if scanned is None:
        return None
    key, signature_name, shape = scanned
    only_input = input_of(signature_name)
    if only_input is None:
        return None
    name, np_dtype = only_input
    value: Input
    if np_dtype.kind == "f":
        value = JsonRows(body, shape, np_dtype)
    else:  # integers: read now, so that a value out of range is this request's error
        raw = np.empty(shape, np.int64)
        if not _json_numbers.fill(body, raw):
            return None  # a fraction, or an integer past int64: the general path's error
        value = numeric_array(raw, np_dtype, name)
    return NumericRequest(signature_name, {name: value}, key == "instances")
