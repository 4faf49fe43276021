"""docs/architecture.md's arrows, enforced: each package imports only the packages below it,
the engine none of ours, and no production module reaches into tests/."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = ("btt_core", "nvdimm", "control", "plugin", "bttctl", "tests", "tools")
# package -> what it may import (docs/architecture.md, the table).
ALLOWED = {
    "btt_core": set(),
    "nvdimm": {"btt_core"},
    "control": {"nvdimm", "btt_core"},
    "plugin": {"control", "nvdimm", "btt_core"},
    "bttctl": {"plugin", "control", "nvdimm", "btt_core"},
}


def imports_of(path: str) -> set[str]:
    """The top-level packages of ours that a module imports, wherever the import sits."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(n.split(".")[0] for n in names if n.split(".")[0] in OURS)
    return found


def modules(package: str):
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down(package):
    wrong = []
    for path in modules(package):
        extra = imports_of(path) - ALLOWED[package] - {package}
        if extra:
            wrong.append(f"{os.path.relpath(path, ROOT)} imports {', '.join(sorted(extra))}")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_wrong_arrow(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from plugin.exports import Registry\n")
    assert imports_of(str(bad)) == {"plugin"}
