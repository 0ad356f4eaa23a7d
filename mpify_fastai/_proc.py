"""Process facts from `/proc`, and the multiprocess internals the launcher relies on, in one place.

multiprocess has no public API for its fork server's pid, for stopping that server, or for telling that a
spawned child is still importing the main module; a multiprocess upgrade that changes them breaks only this file.
"""
from __future__ import annotations
import os
import multiprocess as mp
from multiprocess import forkserver

__all__ = ['process_state', 'pid_alive', 'process_group_members', 'in_spawn_bootstrap', 'forkserver_pid',
           'forkserver_alive', 'stop_forkserver', 'skip_missing_main_path']

def _stat_fields(pid: int | str) -> list[str] | None:
    "The fields of `/proc/<pid>/stat` after the command name (state first), or None when the process is gone."
    try:
        with open(f'/proc/{pid}/stat') as f: stat = f.read()
    except OSError: return None
    return stat[stat.rindex(')') + 2:].split()

def process_state(pid: int) -> str | None:
    "State letter of `pid` ('R', 'S', 'Z', ...), or None when it no longer exists."
    fields = _stat_fields(pid)
    return None if fields is None else fields[0]

def pid_alive(pid: int) -> bool:
    "Whether `pid` exists, zombies included (someone may still reap it); another user's process counts."
    try: os.kill(pid, 0); return True
    except ProcessLookupError: return False
    except PermissionError: return True

def process_group_members(pgid: int) -> list[int]:
    "Live (non-zombie) processes in process group `pgid`: a worker and whatever it started."
    out = []
    for d in os.listdir('/proc'):
        if not d.isdigit(): continue
        fields = _stat_fields(d)
        if fields is not None and int(fields[2]) == pgid and fields[0] != 'Z': out.append(int(d))
    return out

def in_spawn_bootstrap() -> bool:
    "True in a spawned child that is still importing the main module (an unguarded script reaching a launch)."
    return bool(getattr(mp.current_process(), '_inheriting', False))

def forkserver_pid() -> int | None:
    "Pid of multiprocess's fork server, if this process started one."
    return getattr(forkserver._forkserver, '_forkserver_pid', None)

def forkserver_alive() -> bool:
    "Whether the fork server runs; read from /proc, never by reaping it (multiprocess reaps it itself on restart)."
    pid = forkserver_pid()
    return pid is not None and process_state(pid) not in (None, 'Z', 'X')

def stop_forkserver() -> None:
    "Stop the fork server if one was started (the next `ensure_running` starts a new one)."
    if forkserver_pid() is not None: forkserver._forkserver._stop()

def skip_missing_main_path() -> None:
    """A script read from stdin (`python - < train.py`) has `__main__.__file__ == '<stdin>'`, which multiprocess's children
    would try to run as a file, and die: leave out a main path that is no file, as for a notebook. Idempotent."""
    from multiprocess import spawn
    original = spawn.get_preparation_data
    if getattr(original, 'skips_missing_main_path', False): return
    def get_preparation_data(name):
        data = original(name)
        path = data.get('init_main_from_path')
        if path is not None and not os.path.isfile(path): del data['init_main_from_path']
        return data
    get_preparation_data.skips_missing_main_path = True
    spawn.get_preparation_data = get_preparation_data
