"""Files written whole or not at all: a reader (or a restarted job) never finds half a checkpoint, result or job."""
from __future__ import annotations
import os
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ['atomic_write']

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
