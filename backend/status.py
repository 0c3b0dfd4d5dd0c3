"""GetModelStatus and GetModelMetadata answers as TF Serving's own protos, for the REST and gRPC adapters alike."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
)

from backend.models import VersionStatus
from backend.servable import Servable


def status_response(statuses: list[VersionStatus]) -> get_model_status_pb2.GetModelStatusResponse:
    response = get_model_status_pb2.GetModelStatusResponse()
    for status in statuses:
        entry = response.model_version_status.add()
        entry.version = status.version
        entry.state = status.state.value
        entry.status.SetInParent()  # TF Serving always prints the status, OK included
        if status.error is not None:
            entry.status.error_code = status.error.code.value[0]
            entry.status.error_message = status.error.message
    return response


def signature_def_map(servable: Servable) -> get_model_metadata_pb2.SignatureDefMap:
    definitions = get_model_metadata_pb2.SignatureDefMap()
    for key, definition in servable.signature_defs.items():
        definitions.signature_def[key].CopyFrom(definition)
    return definitions


def model_spec(servable: Servable) -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec()
    fill_model_spec(spec, servable)
    return spec


def fill_model_spec(target: model_pb2.ModelSpec, servable: Servable) -> None:
    """`target`, an empty spec (a response's), names the servable."""
    target.name = servable.name
    target.version.value = servable.version


def to_json_dict(message: Any) -> dict[str, Any]:
    """Protobuf JSON as TF Serving prints it: field names as in the .proto, default values included."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def metadata_json_dict(servable: Servable) -> dict[str, Any]:
    """TF Serving's REST metadata body: the model spec, then the signature map unpacked from its `Any`."""
    return {
        "model_spec": to_json_dict(model_spec(servable)),
        "metadata": {"signature_def": to_json_dict(signature_def_map(servable))},
    }
