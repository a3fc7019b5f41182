"""Run a patch when a module is first imported, not before.

Every FastChat process applies every patch (launch.fastchat_entry), but importing the API server
or the Gradio UI in the controller and the workers would cost seconds and create their log files.
`when_imported(name, fn)` calls fn(module) right after `name` executes, or at once if it is loaded.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType

_pending: dict[str, list[Callable[[ModuleType], None]]] = {}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _pending:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_patch(module: ModuleType) -> None:
            exec_module(module)
            for fn in _pending.pop(name, []):
                fn(module)

        spec.loader.exec_module = exec_then_patch  # this loader instance serves this module only
        return spec


_FINDER = _Finder()


def when_imported(name: str, fn: Callable[[ModuleType], None]) -> None:
    mod = sys.modules.get(name)
    if mod is not None:
        fn(mod)
        return
    _pending.setdefault(name, []).append(fn)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
