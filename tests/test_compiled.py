"""The request path runs compiled (setup.py): every module on pyproject.toml's list was built into an extension, so
a build that quietly fell back to plain Python, or a module dropped from the build, shows up here."""

from __future__ import annotations

import importlib
import os
import tomllib
from importlib.machinery import EXTENSION_SUFFIXES

import pytest

from bench.backend_process import REPO

COMPILED = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["tfgate"]["compiled"]


@pytest.mark.skipif(os.environ.get("TFGATE_PURE_PYTHON") == "1", reason="built without compiling")
@pytest.mark.parametrize("path", COMPILED)
def test_each_listed_module_is_an_extension(path: str) -> None:
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    assert module.__file__ is not None and module.__file__.endswith(tuple(EXTENSION_SUFFIXES)), module.__file__
