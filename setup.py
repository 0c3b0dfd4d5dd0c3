"""The build: setuptools, with the request path compiled to C by mypyc (pyproject.toml, [tool.tfgate] compiled).

Why mypyc: the gateway and the backend spend most of their CPU per request in CPython's interpreter, and mypyc turns
these already type-annotated modules into C extensions without rewriting them (callgrind, instructions per request:
gateway 289k → 232k proxied over TLS; backend 319k → 286k per REST predict on top of its compiled HTTP server). The
.py files stay the source; TFGATE_PURE_PYTHON=1 builds without compiling, and the modules then run as plain Python,
as they do wherever no extension was built.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent


def compiled_modules() -> list[str]:
    document = tomllib.loads((HERE / "pyproject.toml").read_text())
    return list(document["tool"]["tfgate"]["compiled"])


def extensions() -> list[Extension]:
    if os.environ.get("TFGATE_PURE_PYTHON") == "1":
        return []
    from mypyc.build import mypycify

    # mypy reads no installed package (--no-site-packages), so the build is the same whether the dependencies are
    # installed yet or not: their values are Any to the compiled code, which checks no type of theirs at run time
    # (some of their stubs are wrong: httptools' URL.query is None for a URL without one, not bytes).
    return mypycify(["--no-site-packages", "--ignore-missing-imports", "--no-warn-unused-ignores",
                     *compiled_modules()], opt_level="3", group_name="tfgate")


setup(ext_modules=extensions())
