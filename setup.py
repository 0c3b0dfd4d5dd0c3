"""The build: setuptools, with the request path compiled to C by mypyc (pyproject.toml, [tool.tfgate] compiled).

Why mypyc: the gateway and the backend spend most of their CPU per request in CPython's interpreter, and mypyc turns
these already type-annotated modules into C extensions without rewriting them (callgrind, instructions per request:
gateway 289k → 232k proxied over TLS; backend 319k → 286k per REST predict on top of its compiled HTTP server). The
.py files stay the source; TFGATE_PURE_PYTHON=1 builds without compiling, and the modules then run as plain Python,
as they do wherever no extension was built.

One extension is C++ of ours: backend/_json_numbers.cpp reads REST predict bodies with simdjson, whose source comes
from the pysimdjson package (a build requirement, pinned): simdjson's runtime CPU dispatch picks its fastest kernels
on the machine that runs it, so the build needs no -march flag (backend/numeric_json.py says why the module exists).
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


def json_numbers() -> Extension:
    import simdjson  # pysimdjson ships simdjson's single-file source beside its module

    source = Path(simdjson.__file__).resolve().parent
    return Extension("backend._json_numbers", sources=["backend/_json_numbers.cpp", str(source / "simdjson.cpp")],
                     include_dirs=[str(source)], language="c++", extra_compile_args=["-std=c++17", "-O2"])


def extensions() -> list[Extension]:
    if os.environ.get("TFGATE_PURE_PYTHON") == "1":
        return []
    from mypyc.build import mypycify

    # mypy reads no installed package (--no-site-packages), so the build is the same whether the dependencies are
    # installed yet or not: their values are Any to the compiled code, which checks no type of theirs at run time
    # (some of their stubs are wrong: httptools' URL.query is None for a URL without one, not bytes).
    return [*mypycify(["--no-site-packages", "--ignore-missing-imports", "--no-warn-unused-ignores",
                       *compiled_modules()], opt_level="3", group_name="tfgate"), json_numbers()]


setup(ext_modules=extensions())
