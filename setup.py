"""Installs the project plus ``moeq-lm-eval.pth``, a one-line startup hook that makes
``lm_eval --model hf --model_args ...,quantized=True`` load our packed checkpoints
(see moeq_lm_eval_hook.py). Everything else is in pyproject.toml."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "moeq-lm-eval.pth"


class BuildWithHook(build_py):
    def run(self):
        super().run()
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH)
        self.copy_file(src, os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildWithHook})
