"""Where a run's checkpoint goes, and what a run guarantees on disk.

- Before any model is loaded: the target's parent is created and checked for writing, the
  target is locked for the whole run (a second run to the same path stops at once), stale
  partial directories of runs that were killed are removed (and said so), and the temporary
  directory the run writes to (``.NAME.partial-PID`` beside the target) is made.
- ``--overwrite`` replaces only an empty directory or a checkpoint this toolkit wrote; never
  a file, the source model, or a directory that holds it.
- At the end the finished directory takes the target's place in one atomic rename (an
  existing target is swapped out with renameat2's RENAME_EXCHANGE, then deleted), so at no
  instant is the target missing or half written.
- On an error, Ctrl-C or SIGTERM the partial directory is removed; after kill -9 the next
  run to that path removes it.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import glob
import os
import shutil

from ..config import ConfigError
from ..quant.format import write_json  # noqa: F401  (one JSON writer for the toolkit)

MARKERS = ("bit_allocation.json", "results.json")  # what every checkpoint of this toolkit holds


def is_ours(path: str) -> bool:
    return os.path.isdir(path) and all(os.path.isfile(os.path.join(path, m)) for m in MARKERS)


def _inside(a: str, b: str) -> bool:
    """Whether path a is b or lies inside it."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def check_target(path: str, overwrite: bool, sources: tuple[str, ...] = ()) -> None:
    """What may be written at ``path``; ``sources``: local checkpoints the run reads."""
    for src in sources:
        if src and os.path.exists(src) and (_inside(path, src) or _inside(src, path)):
            raise ConfigError(f"--saving_path {path} is or contains the checkpoint {src} the run reads: "
                              f"choose another path")
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        raise ConfigError(f"--saving_path {path} is a file, not a checkpoint directory: remove it yourself or "
                          f"choose another path")
    if not os.listdir(path):
        return
    if not overwrite:
        raise ConfigError(f"--saving_path {path} exists and is not empty: pass --overwrite to replace it, "
                          f"or choose another path")
    if not is_ours(path):
        raise ConfigError(f"--saving_path {path} is not a checkpoint this toolkit wrote (no "
                          f"{' and '.join(MARKERS)}): --overwrite replaces only those; remove it yourself or "
                          f"choose another path")


class OutputDir:
    """The target ``path`` of one run, claimed by ``open`` and filled by ``commit``."""

    def __init__(self, path: str, overwrite: bool, sources: tuple[str, ...] = (), say=print):
        self.path = os.path.abspath(path)
        self.overwrite, self.sources, self.say = overwrite, sources, say
        self.parent = os.path.dirname(self.path)
        self.name = os.path.basename(self.path)
        self.tmp = os.path.join(self.parent, f".{self.name}.partial-{os.getpid()}")
        self._lock = None

    def open(self) -> "OutputDir":
        check_target(self.path, self.overwrite, self.sources)
        try:
            os.makedirs(self.parent, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(f"--saving_path {self.path}: a file is in the way of its parent directory "
                              f"{self.parent}: choose another path") from None
        except PermissionError:
            raise ConfigError(f"--saving_path {self.path}: cannot create {self.parent} (permission denied): "
                              f"choose a writable location") from None
        if not os.access(self.parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--saving_path {self.path}: {self.parent} is not writable: choose a writable "
                              f"location")
        self._take_lock(os.path.join(self.parent, f".{self.name}.lock"))
        for stale in glob.glob(os.path.join(self.parent, f".{glob.escape(self.name)}.partial-*")):
            shutil.rmtree(stale, ignore_errors=True)   # we hold the lock: its writer is gone
            self.say(f"removed {stale}, left behind by a run to {self.path} that was stopped")
        os.makedirs(self.tmp)
        return self

    def _take_lock(self, lock_path: str) -> None:
        while True:
            f = open(lock_path, "a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise ConfigError(f"--saving_path {self.path} is being written by another run right now (it holds "
                                  f"{lock_path}): wait for it to finish, or choose another path") from None
            try:
                same = os.stat(lock_path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder removed the file as we opened it: take the new one
                self._lock = f
                return
            f.close()

    def check_space(self, needed: int) -> None:
        free = shutil.disk_usage(self.parent).free
        if free < needed:
            raise ConfigError(f"--saving_path {self.path}: the checkpoint needs about {needed / 2**30:.2f} GiB and "
                              f"{self.parent} has {free / 2**30:.2f} GiB free: free some space or choose another "
                              f"location")

    def commit(self) -> None:
        """The finished temporary directory becomes the target, atomically."""
        check_target(self.path, self.overwrite, self.sources)  # nothing else may have appeared meanwhile
        _move_into_place(self.tmp, self.path)

    def close(self, failed: bool) -> None:
        if failed:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self._lock is not None:
            os.remove(self._lock.name)
            self._lock.close()
            self._lock = None


def replace_dir(path: str, fill) -> None:
    """``fill(tmp)`` writes a directory beside ``path``, which then takes its place atomically
    (for outputs that are not quantization runs, e.g. the testbed's trained models)."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(os.path.abspath(path))}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        fill(tmp)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: str, path: str) -> None:
    if os.path.lexists(path):
        _exchange(tmp, path)      # target and tmp swap places: the target is never missing
        shutil.rmtree(tmp)        # ... then the old content, now at tmp, goes
    else:
        os.rename(tmp, path)


def _exchange(a: str, b: str) -> None:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    at_fdcwd, rename_exchange = -100, 2
    if renameat2 is not None and renameat2(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange) == 0:
        return
    err = ctypes.get_errno() if renameat2 is not None else errno.ENOSYS
    if err not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: the file system cannot exchange
        raise OSError(err, os.strerror(err), b)
    # No atomic exchange on this system: the old checkpoint moves aside first, so for an
    # instant the target is missing (a kill right then leaves the old one at NAME.old-PID).
    old = f"{b}.old-{os.getpid()}"
    os.rename(b, old)
    os.rename(a, b)
    os.rename(old, a)
