"""Which compiled engine the package uses: production unless a test build is asked for.

The production module (_btt_cffi) carries no test-only code. The test build
(_btt_cffi_test, cffi_build.py with BTT_MUTATIONS=1, built by tests/testbuild.py into
build/test-engine/) adds the switches of btt_test.h that break the engine on purpose. It is
used when BTT_TEST_BUILD=1 or BTT_TEST_MUTATION=<name> is set (an nbdkit server started by a
test, tests/testbuild.py server_env); a missing test build is an error, never a silent
fallback to the production module, which would make every mutation test pass vacuously.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUTATION_PREFIX = "BTT_MUT_"


def test_build_wanted() -> bool:
    return os.environ.get("BTT_TEST_BUILD") == "1" or bool(os.environ.get("BTT_TEST_MUTATION"))


def test_build_dir() -> str:
    return os.environ.get("BTT_TEST_BUILD_DIR") or os.path.join(_ROOT, "build", "test-engine")


def _load_test_build() -> Any:
    name = "btt_core._btt_cffi_test"
    if name in sys.modules:
        return sys.modules[name]
    found = sorted(glob.glob(os.path.join(test_build_dir(), "btt_core", "_btt_cffi_test*.so")))
    if not found:
        raise ImportError(f"BTT_TEST_BUILD/BTT_TEST_MUTATION need the engine's test build in "
                          f"{test_build_dir()}: run `python tests/testbuild.py`")
    spec = importlib.util.spec_from_file_location(name, found[-1])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def mutation_value(lib: Any, name: str) -> int:
    """The enum value of a mutation named in kebab-case: map-before-flog ->
    BTT_MUT_MAP_BEFORE_FLOG (btt_test.h)."""
    value = getattr(lib, MUTATION_PREFIX + name.upper().replace("-", "_"), None)
    if not name or value is None:
        raise ValueError(f"unknown mutation {name!r}")
    return int(value)


TEST_BUILD = test_build_wanted()
_module = _load_test_build() if TEST_BUILD else importlib.import_module("btt_core._btt_cffi")

ffi: Any = _module.ffi
lib: Any = _module.lib

if os.environ.get("BTT_TEST_MUTATION"):
    lib.btt_test_mutation = mutation_value(lib, os.environ["BTT_TEST_MUTATION"])
