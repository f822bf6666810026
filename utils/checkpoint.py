"""Where a run's checkpoint goes: written in a temporary directory beside the target and
renamed into place at the end, so the target never holds a half-written checkpoint."""
from __future__ import annotations

import os
import shutil

from ..config import ConfigError
from ..quant.format import write_json  # noqa: F401  (one JSON writer for the toolkit)


def check_output_dir(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)) and not overwrite:
        raise ConfigError(f"--saving_path {path} exists and is not empty: pass --overwrite to replace it, "
                          f"or choose another path")


def temp_dir_for(path: str) -> str:
    """A fresh directory beside ``path`` (same file system, so the final rename is atomic)."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(path))}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit_dir(tmp: str, path: str) -> None:
    """Replace ``path`` by ``tmp`` (the old content is removed only after the rename)."""
    old = None
    if os.path.exists(path):
        old = f"{tmp}.old"
        os.rename(path, old)
    os.rename(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
