"""The split between the production engine and its test build (tests/testbuild.py).

The production module must carry no test-only code; the test build must carry every
mutation, each under its kebab-case name, and each one must have a test that catches it.
"""
import glob
import os
import re
import subprocess
import sys

import pytest

import btt_core
from btt_core import _lib

import testbuild
from conftest import mem_btt

HERE = os.path.dirname(os.path.abspath(__file__))


def exported(so: str) -> list[str]:
    out = subprocess.run(["nm", "-D", "--defined-only", so], capture_output=True, text=True,
                         check=True).stdout
    return [line.split()[-1] for line in out.splitlines() if line.split()[1] in "TDBR"]


def test_the_suite_runs_the_production_module():
    assert not _lib.TEST_BUILD and _lib.lib is btt_core.engine.lib


def test_the_production_module_has_no_mutation_code():
    names = dir(_lib.lib)
    assert "btt_test_mutation" not in names
    assert not [n for n in names if n.startswith(("BTT_MUT_", "btt_debug_"))]
    so = glob.glob(os.path.join(os.path.dirname(btt_core.__file__), "_btt_cffi.*so"))
    assert so, "no production module next to the package"
    syms = exported(so[0])
    # -fvisibility=hidden: the module's init function is its only export.
    assert syms == ["PyInit__btt_cffi"], syms
    assert b"btt_test_mutation" not in open(so[0], "rb").read()


def test_the_test_build_has_every_mutation_by_its_name():
    code = ("from btt_core._lib import lib, TEST_BUILD, MUTATION_PREFIX\n"
            "print(TEST_BUILD, lib.btt_test_mutation)\n"
            "print(' '.join(n for n in dir(lib) if n.startswith(MUTATION_PREFIX)))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, **testbuild.env("no-rtt-wait")))
    assert p.returncode == 0, p.stderr
    first, enums = p.stdout.splitlines()
    assert first == "True 7"  # BTT_TEST_MUTATION switched it on at import
    names = sorted(e[len("BTT_MUT_"):].lower().replace("_", "-") for e in enums.split())
    assert names == sorted([*testbuild.MUTATIONS, "none"])


def test_a_missing_test_build_fails_loudly(tmp_path):
    p = subprocess.run([sys.executable, "-c", "import btt_core"], capture_output=True, text=True,
                       env=dict(os.environ, BTT_TEST_BUILD="1", BTT_TEST_BUILD_DIR=str(tmp_path)))
    assert p.returncode != 0 and "test build" in p.stderr


def test_mutations_and_hooks_exist_only_in_the_test_build():
    with pytest.raises(RuntimeError, match="test build"):
        with testbuild.mutated("no-rtt-wait"):
            pass
    io, b = mem_btt()
    with pytest.raises(RuntimeError, match="test build"):
        testbuild.commit_step(b)
    b.close()


@pytest.mark.testbuild
def test_the_hooks_reach_inside_the_engine_in_the_test_build():
    assert testbuild.active()
    io, b = mem_btt(durability="group")
    b.write(0, bytes(4096))
    assert testbuild.commit_step(b)  # a commit is open
    while testbuild.commit_step(b):
        pass
    assert b.stats()["commits"] == 1
    b.close()


@pytest.mark.parametrize("name", testbuild.MUTATIONS)
def test_each_mutation_has_a_test_that_catches_it(name):
    """Each mutation is named by a test that runs on the test build (in-process, marked
    testbuild; or through nbdkit with server_env), so that a harness that stops catching it
    fails that test."""
    uses = []
    for path in glob.glob(os.path.join(HERE, "test_*.py")):
        if path.endswith("test_testbuild.py"):
            continue
        text = open(path).read()
        for m in re.finditer(rf'"{re.escape(name)}"', text):
            start = text.rfind("\ndef test_", 0, m.start())
            head = text[text.rfind("\n\n", 0, start) if start >= 0 else 0:m.start()]
            if start >= 0 and ("@pytest.mark.testbuild" in head or "server_env(" in head):
                uses.append(os.path.basename(path))
    assert uses, f"no test runs the {name} mutation"
