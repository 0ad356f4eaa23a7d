"""Files of a launch: written whole or not at all (a reader, or a restarted job, never finds half a checkpoint, result
or job), and private folders named after their process, swept once that process is gone (even SIGKILLed)."""
from __future__ import annotations
import os, shutil, tempfile
from pathlib import Path
from typing import BinaryIO, Callable
from .procfs import pid_alive

__all__ = ['atomic_write', 'owned_tempdir', 'sweep_dead_dirs']

_PREFIX = 'mpify-'

def sweep_dead_dirs(root: str) -> None:
    "Remove the `mpify-<pid>-*` folders in `root` whose process is gone (a caller killed before it could clean up)."
    try: names = os.listdir(root)
    except OSError: return
    for n in names:
        pid = n[len(_PREFIX):].split('-')[0]
        if n.startswith(_PREFIX) and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)

def owned_tempdir(kind: str, root: str | None = None) -> str:
    "A new private folder `mpify-<this pid>-<kind>-*` in `root` (default: the temp folder), once dead callers' are swept."
    root = root or tempfile.gettempdir()
    sweep_dead_dirs(root)
    return tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-{kind}-", dir=root)

def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], mode: int = 0o600) -> Path:
    "Call `write(f)` on a private temp file beside `path`, then rename it over `path` (readable and writable by the owner only)."
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), 'wb') as f: write(f)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
