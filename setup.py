"""Installs ``moeq.pth`` beside the ``moeq`` package (configured in pyproject.toml).

``moeq.pth`` is a one-line startup hook (see _startup.py) that registers moeq with
transformers and lm-eval when they are imported. It must sit at the top of site-packages,
in regular and editable installs alike: a regular wheel takes it from the build directory;
an editable wheel carries only what is written straight into it (setuptools sets
``editable_mode`` and points ``install_lib`` there), so the file is written there.
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PTH = "moeq.pth"


class BuildPy(build_py):
    def find_package_modules(self, package, package_dir):
        # the repository root is the package directory: leave this script out of it
        return [m for m in super().find_package_modules(package, package_dir)
                if os.path.abspath(m[2]) != os.path.join(HERE, "setup.py")]

    def run(self):
        super().run()
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(os.path.join(HERE, PTH), os.path.join(target, PTH))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPy})
