"""Startup hook that makes stock ``lm_eval --model hf ... quantized=True`` work.

``pip install .`` puts ``moeq-lm-eval.pth`` into site-packages; Python runs its one
line at every start, which calls ``install()``. That only adds a meta-path finder
(no import of torch or lm-eval): when lm-eval's model table ``lm_eval.models`` is
first imported, the finder lets it load and then calls ``huggingface.register()``,
which points the ``hf`` names at ``QuantizedHFLM``. Without ``quantized=True`` that
class behaves exactly as lm-eval's ``HFLM``. Set ``MOEQ_NO_LM_EVAL_HOOK=1`` to disable.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

TARGET = "lm_eval.models"


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        # lm-eval's own HFLM must be registered first, so that its decorator does not
        # later collide with (or overwrite) ours.
        import lm_eval.models.huggingface  # noqa: F401
        ours = sys.modules.get("huggingface")
        if ours is not None and not hasattr(ours, "register"):
            return  # huggingface.py is being imported right now: it registers itself at its end
        import huggingface
        huggingface.register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also avoids recursion in find_spec below
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    if os.environ.get("MOEQ_NO_LM_EVAL_HOOK") or TARGET in sys.modules:
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
