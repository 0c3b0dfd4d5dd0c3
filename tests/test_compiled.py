"""The request path runs compiled (setup.py): every module on pyproject.toml's list was built into an extension, so
a build that quietly fell back to plain Python, or a module dropped from the build, shows up here."""

from __future__ import annotations

import dataclasses
import importlib
import os
import tomllib
import types
from importlib.machinery import EXTENSION_SUFFIXES

import pytest

from bench.backend_process import REPO

COMPILED = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["tfgate"]["compiled"]
# Mutable dataclasses of compiled modules made only when a config is loaded, whose generated __init__ may stay.
MADE_AT_CONFIG_TIME = {"gateway.balancer.UpstreamLoad", "gateway.upstream.BackendRuntime",
                       "gateway.upstream.PoolRuntime"}


@pytest.mark.skipif(os.environ.get("TFGATE_PURE_PYTHON") == "1", reason="built without compiling")
@pytest.mark.parametrize("path", COMPILED)
def test_each_listed_module_is_an_extension(path: str) -> None:
    module = _module(path)
    assert module.__file__ is not None and module.__file__.endswith(tuple(EXTENSION_SUFFIXES)), module.__file__


def _module(path: str) -> types.ModuleType:
    return importlib.import_module(path.removesuffix(".py").replace("/", "."))


@pytest.mark.skipif(os.environ.get("TFGATE_PURE_PYTHON") == "1", reason="built without compiling")
@pytest.mark.parametrize("path", COMPILED)
def test_classes_made_per_request_have_a_compiled_init(path: str) -> None:
    """A dataclass's generated __init__ runs interpreted even in a compiled module (~260 ns against ~45 ns for one
    written in the class, per object; backend/inference.py's ModelCall says more), so the mutable ones, which the
    request path makes, write their own."""
    module = _module(path)
    generated = [f"{module.__name__}.{name}" for name, cls in vars(module).items()
                 if isinstance(cls, type) and cls.__module__ == module.__name__ and dataclasses.is_dataclass(cls)
                 and not cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
                 and isinstance(cls.__init__, types.FunctionType)]
    assert not set(generated) - MADE_AT_CONFIG_TIME
