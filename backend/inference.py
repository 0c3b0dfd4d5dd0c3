"""The backend's one core: predict, classify and regress on a loaded version, independent of REST or gRPC.

Each call is three steps, so that something can sit between validating and running (a batching queue):
`*_call()` validates a request against the signature (input names, shapes, signature kind, output aliases) and
returns a `ModelCall`; a runner runs it (`run()` here, on an executor, or merged with others by the batcher); the
adapters, or `classify_results()` / `regress_results()`, turn the outputs into answers. Validation lives here so
REST and gRPC cannot drift apart. Functions here block: callers run them off the event loop when they are heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from backend.errors import InvalidArgument
from backend.servable import CLASSIFY_METHOD, REGRESS_METHOD, Servable, Signature, TensorSpec

CLASSIFY_INPUTS, CLASSIFY_CLASSES, CLASSIFY_SCORES = "inputs", "classes", "scores"
REGRESS_INPUTS, REGRESS_OUTPUTS = "inputs", "outputs"

Classification = list[tuple[bytes, float]]


# Made per request, so made cheaply: not frozen (a frozen dataclass costs ~3x as much to make), and with an __init__
# of its own, which mypyc compiles (~45 ns), where the one dataclasses generates runs interpreted (~260 ns; with
# dataclasses' frozen __setattr__, 1.3 µs). Every class made per request in a compiled module does the same:
# tests/test_compiled.py checks it.
@dataclass(slots=True, init=False)
class ModelCall:
    """A validated request: which signature of which version to run, on what, for which outputs."""

    servable: Servable
    signature: Signature
    inputs: Mapping[str, np.ndarray]
    output_keys: tuple[str, ...]

    def __init__(self, servable: Servable, signature: Signature, inputs: Mapping[str, np.ndarray],
                 output_keys: tuple[str, ...]) -> None:
        self.servable, self.signature, self.inputs, self.output_keys = servable, signature, inputs, output_keys

    @property
    def rows(self) -> int | None:
        """Rows along dimension 0 shared by every input; None when the call cannot be batched (scalars, mixed)."""
        sizes = {value.shape[0] if value.ndim else None for value in self.inputs.values()}
        return sizes.pop() if len(sizes) == 1 else None


def run(call: ModelCall) -> dict[str, np.ndarray]:
    return call.signature.run(call.inputs, call.output_keys)


def predict_call(servable: Servable, signature_key: str, inputs: Mapping[str, np.ndarray],
                 output_filter: Sequence[str] = ()) -> ModelCall:
    signature = servable.signature(signature_key)
    check_input_names(inputs.keys(), signature.inputs.keys())
    for name, value in inputs.items():
        check_shape(name, value, signature.inputs[name])
    unknown = [alias for alias in output_filter if alias not in signature.outputs]
    if unknown:
        raise InvalidArgument(f"output tensor alias not found in signature: {unknown[0]} Outputs expected to be in "
                              f"the set {{{','.join(sorted(signature.outputs))}}}.")
    return ModelCall(servable, signature, inputs, tuple(output_filter) or tuple(signature.outputs))


def classify_call(servable: Servable, signature_key: str, examples: list[bytes]) -> ModelCall:
    signature = _example_signature(servable, signature_key, CLASSIFY_METHOD, "classification", CLASSIFY_INPUTS)
    wanted = tuple(key for key in (CLASSIFY_CLASSES, CLASSIFY_SCORES) if key in signature.outputs)
    if not wanted:
        raise InvalidArgument("Expected classification signature outputs to contain at least one of classes or "
                              "scores")
    return _examples_call(servable, signature, examples, wanted)


def classify_results(call: ModelCall, outputs: Mapping[str, np.ndarray]) -> list[Classification]:
    """Per example, its (label, score) pairs; a missing `classes` output gives empty labels, missing `scores` 0."""
    count = _example_count(call)
    classes, scores = outputs.get(CLASSIFY_CLASSES), outputs.get(CLASSIFY_SCORES)
    for key, array in outputs.items():
        if array.ndim != 2 or array.shape[0] != count:
            raise InvalidArgument(f"Expected {key} Tensor of shape [batch_size, num_classes] with batch_size "
                                  f"{count}; got {list(array.shape)}")
    if classes is not None and scores is not None and classes.shape != scores.shape:
        raise InvalidArgument(f"classes and scores differ in shape: {list(classes.shape)} vs {list(scores.shape)}")
    width = (classes if classes is not None else scores).shape[1]  # type: ignore[union-attr]
    return [
        [(classes[row, k] if classes is not None else b"", float(scores[row, k]) if scores is not None else 0.0)
         for k in range(width)]
        for row in range(count)
    ]


def regress_call(servable: Servable, signature_key: str, examples: list[bytes]) -> ModelCall:
    signature = _example_signature(servable, signature_key, REGRESS_METHOD, "regression", REGRESS_INPUTS)
    if REGRESS_OUTPUTS not in signature.outputs:
        raise InvalidArgument("No regression outputs found in SignatureDef")
    return _examples_call(servable, signature, examples, (REGRESS_OUTPUTS,))


def regress_results(call: ModelCall, outputs: Mapping[str, np.ndarray]) -> list[float]:
    count = _example_count(call)
    values = outputs[REGRESS_OUTPUTS]
    if values.shape not in ((count,), (count, 1)):
        raise InvalidArgument("Expected output Tensor shape to be either [batch_size] or [batch_size, 1] but got "
                              f"{list(values.shape)}")
    return values.reshape(-1).astype(float).tolist()


def predict(servable: Servable, signature_key: str, inputs: Mapping[str, np.ndarray],
            output_filter: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Validate and run at once (warm-up, benchmarks)."""
    return run(predict_call(servable, signature_key, inputs, output_filter))


def classify(servable: Servable, signature_key: str, examples: list[bytes]) -> list[Classification]:
    call = classify_call(servable, signature_key, examples)
    return classify_results(call, run(call))


def regress(servable: Servable, signature_key: str, examples: list[bytes]) -> list[float]:
    call = regress_call(servable, signature_key, examples)
    return regress_results(call, run(call))


def _example_signature(servable: Servable, key: str, method: str, kind: str, input_key: str) -> Signature:
    signature = servable.signature(key)
    if signature.method_name != method:
        raise InvalidArgument(f"Expected {kind} signature method_name to be {method}. Was: {signature.method_name}")
    if len(signature.inputs) != 1:
        raise InvalidArgument("Expected one input Tensor.")
    if input_key not in signature.inputs:
        raise InvalidArgument(f"No {kind} inputs found in SignatureDef")
    return signature


def _examples_call(servable: Servable, signature: Signature, examples: list[bytes],
                   output_keys: tuple[str, ...]) -> ModelCall:
    batch = np.empty(len(examples), dtype=object)
    batch[:] = examples
    return ModelCall(servable, signature, {next(iter(signature.inputs)): batch}, output_keys)


def _example_count(call: ModelCall) -> int:
    return len(next(iter(call.inputs.values())))


def check_input_names(sent: Iterable[str], expected: Iterable[str]) -> None:
    sent_set, expected_set = set(sent), set(expected)
    if sent_set != expected_set:
        raise InvalidArgument(
            f"input size does not match signature: {len(sent_set)}!={len(expected_set)} len({sorted(sent_set)}) != "
            f"len({sorted(expected_set)}). Sent extra: {sorted(sent_set - expected_set)}. "
            f"Missing but required: {sorted(expected_set - sent_set)}.")


def check_shape(name: str, value: np.ndarray, spec: TensorSpec) -> None:
    expected = spec.shape
    if expected is None:
        return
    if value.ndim != len(expected) or any(want not in (-1, got) for want, got in zip(expected, value.shape)):
        raise InvalidArgument(f"input '{name}' has shape [{','.join(map(str, value.shape))}] but the signature "
                              f"expects {spec.describe()}")
