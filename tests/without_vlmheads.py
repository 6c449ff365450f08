"""Runs a script with vlmheads made unimportable: `python without_vlmheads.py SCRIPT ARGS...`.

A Hub user of a saved folder does not have vlmheads: only the folder's own code may serve the Auto classes.
"""

import importlib.abc
import runpy
import sys


class _BlockVlmheads(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "vlmheads":
            raise ModuleNotFoundError(f"No module named {name!r}")


sys.meta_path.insert(0, _BlockVlmheads())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
