"""Files of a launch: written whole or not at all (a reader, or a restarted job, never finds half a checkpoint, result
or job); files with no name at all, freed with the last process that holds them (a call's data in /dev/shm); and private
folders named after their process, swept once that process is gone (even SIGKILLed)."""
from __future__ import annotations
import errno, os, shutil, tempfile, time
from pathlib import Path
from typing import BinaryIO, Callable
from .procfs import pid_alive, process_state

__all__ = ['atomic_write', 'atomic_move', 'owned_tempdir', 'sweep_dead_dirs', 'sweep_torch_shm', 'shm_root', 'AnonymousFile']

_PREFIX = 'mpify-'

def sweep_dead_dirs(root: str) -> None:
    "Remove the `mpify-<pid>-*` folders in `root` whose process is gone (a caller killed before it could clean up)."
    try: names = os.listdir(root)
    except OSError: return
    for n in names:
        pid = n[len(_PREFIX):].split('-')[0]
        if n.startswith(_PREFIX) and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)

def _pgid(pid: int) -> int | None:
    "The process group of `pid`, or None when it is gone."
    try: return os.getpgid(pid)
    except OSError: return None

def sweep_torch_shm(since: float, groups=(), wait: float = 2.0, root: str = '/dev/shm') -> list[str]:
    """Remove torch's shared-memory files (`torch_<pid>_*`) made since `since` (`time.time()`) by processes now gone, and
    return them: torch names such a file before it sizes and unlinks it, and leaves it when that fails (a full /dev/shm)
    or its process is killed in between. A maker still in one of the process `groups` (a stopped worker's, being
    killed) is waited for, up to `wait` seconds."""
    out, deadline = [], time.monotonic() + wait
    try: names = os.listdir(root)
    except OSError: return out
    for n in names:
        pid = n.split('_')[1] if n.count('_') >= 2 else ''
        if not (n.startswith('torch_') and pid.isdigit()): continue
        path = os.path.join(root, n)
        try: st = os.stat(path)
        except OSError: continue
        if st.st_uid != os.getuid() or st.st_ctime < since - 1: continue
        while process_state(int(pid)) not in (None, 'Z', 'X') and _pgid(int(pid)) in groups and time.monotonic() < deadline:
            time.sleep(0.01)
        if process_state(int(pid)) in (None, 'Z', 'X'):
            try: os.unlink(path); out.append(path)
            except OSError: pass
    return out

def owned_tempdir(kind: str, root: str | None = None) -> str:
    "A new private folder `mpify-<this pid>-<kind>-*` in `root` (default: the temp folder), once dead callers' are swept."
    root = root or tempfile.gettempdir()
    sweep_dead_dirs(root)
    return tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-{kind}-", dir=root)

def shm_root() -> str:
    "Where a call's data goes: the shared-memory tmpfs where there is one, else the temp folder."
    return '/dev/shm' if os.path.isdir('/dev/shm') and os.access('/dev/shm', os.W_OK) else tempfile.gettempdir()

class AnonymousFile:
    """A file with no name in `folder` (`O_TMPFILE`; else created and unlinked at once): its bytes live while this
    object or a process that opened `path` holds it, and are freed when the last one goes, however it dies. Other
    processes open it through `path`, this process's `/proc/<pid>/fd/<n>`."""
    def __init__(self, folder: str):
        try: self.fd = os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o600)
        except (AttributeError, OSError):
            self.fd, name = tempfile.mkstemp(prefix=f'{_PREFIX}{os.getpid()}-anon-', dir=folder)
            os.unlink(name)
        self.path = f'/proc/{os.getpid()}/fd/{self.fd}'
    def write(self, data, offset: int | None = None) -> None:
        "Write all of `data` (bytes or a buffer) at `offset`, or at the end."
        view, at = memoryview(data).cast('B'), os.fstat(self.fd).st_size if offset is None else offset
        while view:
            n = os.pwrite(self.fd, view, at)
            view, at = view[n:], at + n
    def read(self) -> bytes:
        "Everything in the file, whatever another process wrote into it."
        return os.pread(self.fd, os.fstat(self.fd).st_size, 0)
    def close(self) -> None:
        "Let go of the file: its bytes are freed once no other process holds it either."
        if self.fd >= 0: os.close(self.fd); self.fd = -1
    __del__ = close

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

def atomic_move(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    "Move `src` to `dst` in one step (a rename; across filesystems a whole copy renamed into place), then `src` is gone."
    try: os.replace(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV: raise
        with open(src, 'rb') as f: atomic_write(dst, lambda out: shutil.copyfileobj(f, out))
        os.unlink(src)
    return Path(dst)
