"""tf.Example inputs of classify and regress: from TF Serving's JSON (`context` + `examples`) or from its `Input`
proto, to the serialized examples a classify/regress signature parses.

JSON feature values follow TF Serving: integers become int64 features, numbers with a fraction become float features
(a list with any fraction becomes a float list), strings and `{"b64": ...}` become bytes. A `context` is merged into
every example the way TF Serving does it: its serialized bytes come first, so an example's own feature of the same
name wins.
"""

from __future__ import annotations

from typing import Any, Mapping

from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow_serving.apis import input_pb2

from backend.errors import InvalidArgument
from backend.tensors import decode_b64

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def serialized_examples_from_json(request: Mapping[str, Any]) -> list[bytes]:
    examples = request.get("examples")
    if not isinstance(examples, list):
        raise InvalidArgument("'examples' key missing in the request, or not a list")
    if not examples:
        raise InvalidArgument("'examples' is empty: send at least one example")
    context = request.get("context")
    prefix = b"" if context is None else example_from_json(context, "context").SerializeToString()
    return [prefix + example_from_json(example, f"examples[{i}]").SerializeToString()
            for i, example in enumerate(examples)]


def example_from_json(features: Any, where: str) -> example_pb2.Example:
    if not isinstance(features, dict):
        raise InvalidArgument(f"{where} must be a JSON object of feature name to value")
    example = example_pb2.Example()
    for name, value in features.items():
        _fill_feature(example.features.feature[name], value, f"{where}.{name}")
    return example


def _fill_feature(feature: feature_pb2.Feature, value: Any, where: str) -> None:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise InvalidArgument(f"feature {where} is an empty list: its type cannot be told")
    if all(isinstance(item, (str, dict)) for item in values):
        feature.bytes_list.value.extend(_feature_bytes(item, where) for item in values)
    elif all(isinstance(item, int) and not isinstance(item, bool) for item in values):
        if any(not _INT64_MIN <= item <= _INT64_MAX for item in values):
            raise InvalidArgument(f"feature {where} holds an integer out of int64 range")
        feature.int64_list.value.extend(values)
    elif all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in values):
        feature.float_list.value.extend(values)
    else:
        raise InvalidArgument(f"feature {where} must be a number, a string, a {{\"b64\": ...}} object, or a list "
                              "of one kind of these")


def _feature_bytes(item: str | dict[str, Any], where: str) -> bytes:
    if isinstance(item, str):
        return item.encode()
    if set(item) != {"b64"}:
        raise InvalidArgument(f"feature {where}: an object value must be {{\"b64\": ...}}")
    return decode_b64(item["b64"], where)


def serialized_examples_from_proto(message: input_pb2.Input) -> list[bytes]:
    """The gRPC form of the same input: an ExampleList, or an ExampleListWithContext."""
    kind = message.WhichOneof("kind")
    if kind == "example_list":
        examples = [example.SerializeToString() for example in message.example_list.examples]
    elif kind == "example_list_with_context":
        prefix = message.example_list_with_context.context.SerializeToString()
        examples = [prefix + example.SerializeToString()
                    for example in message.example_list_with_context.examples]
    else:
        raise InvalidArgument("Input is empty")
    if not examples:
        raise InvalidArgument("Input is empty")
    return examples
