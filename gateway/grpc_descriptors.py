"""The descriptors of the gRPC services the gateway serves, for server reflection, without importing TensorFlow.

Why: reflection must answer with the real descriptors of TF Serving's PredictionService and ModelService and of
every message they use (PredictRequest, TensorProto, MetaGraphDef, ...). They live in generated `*_pb2` modules, and
TF Serving's import `tensorflow.core.*_pb2`, which runs tensorflow/__init__.py: seconds and hundreds of MB in every
gateway process.

How: a module protoc generates is one `AddSerializedFile(b"<FileDescriptorProto>")` call and one import per
dependency, under an alias protoc derives from the dependency's .proto name (its ModuleAlias:
"tensorflow/core/framework/tensor.proto" → `tensorflow_dot_core_dot_framework_dot_tensor__pb2`). So each module's
source is read with `ast`, never executed: the bytes are the file and name its dependencies, and the aliased imports
say which module holds each one. That matters because the .proto name does not always give the module:
"xla/tsl/protobuf/error_codes.proto" ships as `tensorflow.compiler.xla.tsl.protobuf.error_codes_pb2`. A module is
found through its top-level package's `importlib.util.find_spec`, which locates the package without importing it.
The files go into a private DescriptorPool, dependencies first, once at start (a few milliseconds).
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterable
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool

# The modules of the services the gRPC endpoint serves; their dependencies are found from them.
SERVED_MODULES = ("tensorflow_serving.apis.prediction_service_pb2", "tensorflow_serving.apis.model_service_pb2",
                  "grpc_health.v1.health_pb2", "grpc_reflection.v1alpha.reflection_pb2")


class DescriptorError(Exception):
    """A generated module is missing, or not as protoc writes it."""


def served_pool(modules: Iterable[str] = SERVED_MODULES) -> descriptor_pool.DescriptorPool:
    """A new pool holding the files of `modules` and all their dependencies."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(module: str, needed_by: str) -> None:
        if module in added:
            return
        serialized, imports = _read(_source_of(module, needed_by))
        file = descriptor_pb2.FileDescriptorProto.FromString(serialized)
        for dependency in file.dependency:
            imported = imports.get(_module_alias(dependency))
            if imported is None:
                raise DescriptorError(f"{module} does not import the module of its dependency {dependency}")
            add(imported, file.name)
        pool.AddSerializedFile(serialized)
        added.add(module)

    for module in modules:
        add(module, "the gateway")
    return pool


def _source_of(module: str, needed_by: str) -> Path:
    top, _, rest = module.partition(".")
    spec = importlib.util.find_spec(top)  # a top-level name: located, not imported
    relative = Path(*rest.split(".")).with_suffix(".py")
    for location in (spec.submodule_search_locations or ()) if spec is not None else ():
        if (path := Path(location) / relative).is_file():
            return path
    raise DescriptorError(f"cannot find module {module} (for {needed_by}): is its package installed?")


def _read(path: Path) -> tuple[bytes, dict[str, str]]:
    """The serialized FileDescriptorProto a generated module adds, and its imports by alias (protoc writes both at
    the module's top level)."""
    serialized: bytes | None = None
    imports: dict[str, str] = {}
    for node in ast.parse(path.read_bytes(), filename=str(path)).body:
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imports.update({name.asname: f"{node.module}.{name.name}" for name in node.names if name.asname})
        elif isinstance(node, ast.Import):
            imports.update({name.asname: name.name for name in node.names if name.asname})
        elif isinstance(node, ast.Assign) and (added := _added_file(node.value)) is not None:
            serialized = added
    if serialized is None:
        raise DescriptorError(f"{path} adds no serialized file descriptor: not a module protoc generated")
    return serialized, imports


def _added_file(value: ast.expr) -> bytes | None:
    """The bytes of `... .AddSerializedFile(b"...")`, or None for any other expression."""
    if (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)
            and value.func.attr == "AddSerializedFile" and len(value.args) == 1
            and isinstance(value.args[0], ast.Constant) and isinstance(value.args[0].value, bytes)):
        return value.args[0].value
    return None


def _module_alias(proto: str) -> str:
    """The name protoc's generated Python imports the module of `proto` as (ModuleAlias in python/helpers.cc)."""
    module = proto.removesuffix(".proto").replace("-", "_").replace("/", ".") + "_pb2"
    return module.replace("_", "__").replace(".", "_dot_")
