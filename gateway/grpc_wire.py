"""The `model_spec` of a TF Serving gRPC request, read and replaced in the serialized bytes. Plain code, no I/O.

Why: the gateway routes a gRPC call by its model spec alone. Decoding a whole PredictRequest would copy every tensor
into Python objects and encoding it again would copy them back, a cost that grows with the tensors; the wire format
lets the gateway find one field and skip the rest by length.

How it works: a serialized message is a sequence of fields, each a varint key (field number << 3 | wire type) and a
value whose length the wire type gives (varint; 8 or 4 bytes; or a varint length and that many bytes). The model
spec is field 1 of PredictRequest, ClassificationRequest, RegressionRequest, GetModelMetadataRequest and
GetModelStatusRequest (TF Serving's `apis/*.proto`). A parser merges every occurrence of an embedded message field,
so `read_model_spec` does too. `with_model_spec` drops every occurrence and appends the new one: field order does
not matter on the wire, and the other fields' bytes are kept as they are.

Guarantees: nothing is read past the buffer; bytes that are not a valid message (truncated, a length past the end,
an over-long varint, deprecated group wire types) raise WireError; `with_model_spec`'s result parses to the same
message with only the model spec replaced. A message of more than MAX_FIELDS fields is refused (WireError): each
costs about a microsecond here, and one 4 MB request of two-byte fields held a gateway worker's event loop for
seconds, before its caller was authorized for the model the message names.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from tensorflow_serving.apis.model_pb2 import ModelSpec

MODEL_SPEC_FIELD = 1
TASKS_FIELD = 1  # MultiInferenceRequest.tasks: the model spec sits in each task
_METHOD_NAME_FIELD = 2  # InferenceTask.method_name
_LENGTH_DELIMITED = 2
_FIXED_SIZES = {1: 8, 5: 4}  # wire type → bytes
_MAX_VARINT_BYTES = 10
# TF Serving's requests have one top-level field per input, output filter, task or metadata field name (and a model
# spec): a few, or thousands for the widest models. A message field counts as one, however big.
MAX_FIELDS = 10_000


class WireError(ValueError):
    """The bytes are not a serialized protobuf message."""


@dataclass(slots=True)  # not frozen: made per field read (see backend/inference.py's ModelCall)
class Field:
    number: int
    wire_type: int
    start: int  # where its key starts
    value_start: int  # where its value starts (after the length, for a length-delimited field)
    end: int


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    for index in range(position, min(position + _MAX_VARINT_BYTES, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    raise WireError("a varint is truncated or longer than 10 bytes")


def fields(message: bytes | memoryview) -> Iterator[Field]:
    """The top-level fields of a serialized message, in order."""
    data = memoryview(message)
    position = count = 0
    while position < len(data):
        count += 1
        if count > MAX_FIELDS:
            raise WireError(f"more than {MAX_FIELDS} fields in one message (tfgate's limit)")
        start = position
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire_type == 0:
            value_start = position
            _, position = _varint(data, position)
            yield Field(number, wire_type, start, value_start, position)
            continue
        if wire_type == _LENGTH_DELIMITED:
            length, value_start = _varint(data, position)
            end = value_start + length
        elif wire_type in _FIXED_SIZES:
            value_start, end = position, position + _FIXED_SIZES[wire_type]
        else:
            raise WireError(f"wire type {wire_type} (groups are not used by TF Serving's messages)")
        if end > len(data):
            raise WireError(f"field {number} runs past the end of the message")
        position = end
        yield Field(number, wire_type, start, value_start, end)


def read_model_spec(message: bytes) -> tuple[ModelSpec, list[Field]]:
    """The model spec (empty when absent) and where it sits; WireError for bytes that are not a message."""
    spec = ModelSpec()
    found = [field for field in fields(message) if field.number == MODEL_SPEC_FIELD]
    data = memoryview(message)
    for field in found:
        if field.wire_type != _LENGTH_DELIMITED:
            raise WireError(f"model_spec has wire type {field.wire_type}, not a message")
        try:
            spec.MergeFromString(data[field.value_start:field.end])
        except DecodeError as error:
            raise WireError(f"model_spec does not parse: {error}") from None
    return spec, found


def with_model_spec(message: bytes, found: list[Field], spec: ModelSpec) -> bytes:
    """`message` with the model spec fields in `found` (from read_model_spec) replaced by `spec`."""
    return _replace(message, found, [spec.SerializeToString()])


def read_tasks(message: bytes) -> list[tuple[ModelSpec, str, Field]]:
    """A MultiInferenceRequest's tasks (field 1, each an InferenceTask: model_spec = 1, method_name = 2): their
    model spec, method name and where each task sits."""
    data = memoryview(message)
    tasks = []
    for field in fields(message):
        if field.number != TASKS_FIELD:
            continue
        if field.wire_type != _LENGTH_DELIMITED:
            raise WireError(f"tasks has wire type {field.wire_type}, not a message")
        task = bytes(data[field.value_start:field.end])
        spec, _ = read_model_spec(task)
        method = b"".join(bytes(memoryview(task)[f.value_start:f.end]) for f in fields(task)
                          if f.number == _METHOD_NAME_FIELD and f.wire_type == _LENGTH_DELIMITED)
        tasks.append((spec, method.decode("utf-8", "replace"), field))
    return tasks


def with_task_versions(message: bytes, tasks: list[tuple[ModelSpec, str, Field]], version: int | None,
                       label: str | None) -> bytes:
    """A MultiInferenceRequest whose every task asks for `version` or `label`, each keeping its own signature."""
    data = memoryview(message)
    payloads = []
    for spec, _method, field in tasks:
        task = bytes(data[field.value_start:field.end])
        _, found = read_model_spec(task)
        chosen = ModelSpec()
        chosen.CopyFrom(spec)
        if version is not None:
            chosen.version.value = version
        elif label is not None:
            chosen.version_label = label
        payloads.append(with_model_spec(task, found, chosen))
    return _replace(message, [field for *_, field in tasks], payloads)


def _replace(message: bytes, found: list[Field], payloads: list[bytes]) -> bytes:
    """`message` without the fields in `found`, then `payloads` appended as field 1 (model_spec, or tasks): on the
    wire, field order does not matter, and a repeated field keeps the order its items are appended in."""
    data = memoryview(message)
    parts: list[bytes | memoryview] = []
    position = 0
    for field in found:
        parts.append(data[position:field.start])
        position = field.end
    parts.append(data[position:])
    key = bytes((MODEL_SPEC_FIELD << 3 | _LENGTH_DELIMITED,))
    parts.extend(key + _encode_varint(len(payload)) + payload for payload in payloads)
    return b"".join(parts)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)
