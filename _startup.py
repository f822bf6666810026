"""Startup hook: makes an installed moeq work with no import in the user's code.

``pip install`` (regular or editable) puts ``moeq.pth`` into site-packages; Python runs its
one line at every start, which calls ``install()``. That only adds a meta-path finder (no
torch, transformers or lm-eval import). When one of the modules below is first imported,
the finder lets it load, then runs moeq's registration for it:

- ``transformers.quantizers.auto`` (transformers' quantizer registry): the ``moeq``
  quantization method, so ``from_pretrained`` loads packed checkpoints (hf_quantizer.py);
- ``lm_eval.models`` (lm-eval's model table): lm-eval's ``hf`` names point at
  ``huggingface.QuantizedHFLM``, which adds the paper's ``quantized=`` argument.

Set ``MOEQ_NO_HOOK=1`` to disable both.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys


def _register(module: str) -> None:
    """Import moeq's ``module``, which registers itself at its end. If that very module is
    being imported right now (it imports the target), its own last line will do it."""
    name = f"{__package__}.{module}"
    if name in sys.modules and not hasattr(sys.modules[name], "register"):
        return
    importlib.import_module(name).register()


def _register_quantizer():
    _register("hf_quantizer")


def _register_lm_eval():
    # lm-eval's own HFLM must be registered first, so that its decorator does not later
    # collide with (or overwrite) ours.
    import lm_eval.models.huggingface  # noqa: F401
    _register("huggingface")


TARGETS = {"transformers.quantizers.auto": _register_quantizer, "lm_eval.models": _register_lm_eval}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, then):
        self.inner, self.then = inner, then

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        self.then()


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.pending = {name: fn for name, fn in TARGETS.items() if name not in sys.modules}

    def find_spec(self, fullname, path, target=None):
        then = self.pending.pop(fullname, None)
        if then is None:
            return None
        if not self.pending:
            sys.meta_path.remove(self)
        # the module's real spec, found by the finders after this one
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, then)
        return spec


def install() -> None:
    if os.environ.get("MOEQ_NO_HOOK") or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    finder = _Finder()
    if finder.pending:
        sys.meta_path.insert(0, finder)
