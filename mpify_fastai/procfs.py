"""Process facts read from `/proc`: whether a process lives, its state, the members of a process group."""
from __future__ import annotations
import os

__all__ = ['process_state', 'pid_alive', 'process_group_members']

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
