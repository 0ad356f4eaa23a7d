"""Job-file safety checks, kept free of torch and fastai so an unsafe file is refused at once."""
from __future__ import annotations
import hashlib, os, stat
from pathlib import Path

__all__ = ['JobFileError', 'check_job_file', 'check_result_path', 'job_digest']

class JobFileError(RuntimeError):
    "A job file (or its result path) that is unsafe or unusable."

def check_job_file(path: str | os.PathLike) -> Path:
    "Refuse a job file that is missing, not a file, or writable by group or others (loading a job runs its code)."
    path = Path(path)
    try: st = path.stat()
    except FileNotFoundError: raise JobFileError(f"job file {path} does not exist") from None
    if not stat.S_ISREG(st.st_mode): raise JobFileError(f"job file {path} is not a regular file")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise JobFileError(f"refusing job file {path}: it is writable by group or others (mode {stat.filemode(st.st_mode)}), "
                           f"and loading a job runs its code. Fix with: chmod go-w {path}")
    return path

def check_result_path(path: str | os.PathLike) -> Path:
    "The result's folder must exist before training starts, not be found missing at the first checkpoint."
    path = Path(path)
    if not path.parent.resolve().is_dir(): raise JobFileError(f"the folder of --result {path} does not exist")
    return path

def job_digest(data: bytes) -> str:
    "Identifies a job's bytes, so a checkpoint left by another job is never resumed from."
    return hashlib.sha256(data).hexdigest()
