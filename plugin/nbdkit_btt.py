"""nbdkit entry script: `nbdkit python plugin/nbdkit_btt.py region=FILE ...`.

nbdkit embeds Debian's Python (3.11.2), not the `python3` first on PATH, and does not put
this directory on sys.path. So: find the project's venv beside this file, check it was
made from the same interpreter nbdkit embeds, add its site-packages with site.addsitedir
(which runs the .pth files an editable install relies on), then load the callbacks.
"""
import os
import site
import sys

_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_venv = os.path.join(_root, ".venv")
_site = os.path.join(_venv, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}",
                     "site-packages")
if os.path.isdir(_site):
    with open(os.path.join(_venv, "pyvenv.cfg")) as _cfg:
        _home = dict(line.split(" = ", 1) for line in _cfg.read().splitlines() if " = " in line)
    if os.path.dirname(_home.get("home", "").rstrip("/")) != sys.base_prefix.rstrip("/"):
        raise RuntimeError(f"{_venv} was made from {_home.get('home')}, but nbdkit embeds the "
                           f"Python in {sys.base_prefix}; rebuild it with `make clean venv`")
    site.addsitedir(_site)
if _root not in sys.path:
    sys.path.insert(0, _root)

from plugin.nbdkit_callbacks import *  # noqa: E402,F401,F403
