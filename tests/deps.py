"""Declared dependencies in the tests: a missing one fails, it is not a skip.

Everything the project's ``test`` extra declares (transformers, tritonclient, pytriton,
matplotlib, cuda-bindings, Open MPI's ``mpirun``) is installed by ``make test``; a test
that skipped when one was missing would let a broken install pass as green. Set
``KUNSERVE_TESTS_ALLOW_MISSING_DEPS=1`` to skip such tests instead (a partial install on
purpose). A missing GPU is different: GPU tests are marked and skip without one.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

OPT_OUT = "KUNSERVE_TESTS_ALLOW_MISSING_DEPS"


def missing(what: str, why: str) -> None:
    """Fail (or, with the opt-out set, skip) because a declared dependency is missing."""
    text = f"{what} is missing ({why}); it is a declared test dependency: run `make test`, or set {OPT_OUT}=1 to skip"
    if os.environ.get(OPT_OUT) == "1":
        pytest.skip(text, allow_module_level=True)
    pytest.fail(text, pytrace=False)


def require(module: str) -> ModuleType:
    """Import ``module``, failing the test (or the module's collection) if it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing(f"the module {module}", str(exc))
