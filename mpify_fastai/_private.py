"""Every private API of another library that this package relies on, in one place, each with what it stands in for.

multiprocess, torch, numpy, fastai and the standard library give no public way to do these things; an upgrade that
changes one of them breaks only this file. Nothing here imports torch or fastai: it reaches into what the caller has.
"""
from __future__ import annotations
import contextlib, functools, os, subprocess, sys, threading
import multiprocess as mp
from multiprocess import forkserver, spawn

__all__ = ['forkserver_pid', 'stop_forkserver', 'start_forkserver', 'in_spawn_bootstrap', 'main_not_rerun',
           'nvml_gpu_count', 'ddp_ignore_parameters', 'numpy_frombuffer', 'LRU_CACHE_WRAPPER', 'LRU_CACHE_INFO',
           'valid_metrics', 'train_metrics', 'loader_workers', 'set_loader_workers']

# ---------------------------------------------------------------- multiprocess

def forkserver_pid() -> int | None:
    "Pid of multiprocess's fork server, if this process started one (no public accessor)."
    return getattr(forkserver._forkserver, '_forkserver_pid', None)

def stop_forkserver() -> None:
    "Stop the fork server if one was started; the next `ensure_running` starts a new one (no public stop)."
    if forkserver_pid() is not None: forkserver._forkserver._stop()

class _ServerUtil:
    """multiprocess's `util` as its forkserver module sees it, except that a server started by `start_forkserver` (in this
    thread) gets that call's `env` rather than this process's environment."""
    def __init__(self, util): self.util,self.env,self.servers = util,threading.local(),[]
    def __getattr__(self, name): return getattr(self.util, name)
    def spawnv_passfds(self, path, args, passfds):
        env = getattr(self.env, 'value', None)
        if env is None: return self.util.spawnv_passfds(path, args, passfds)
        p = subprocess.Popen(args, executable=path, pass_fds=passfds, env=env, restore_signals=False)
        self.servers.append(p)   # kept: multiprocess reaps the server itself, a Popen collected while it runs would reap it too
        return p.pid

def start_forkserver(env: dict[str, str]) -> None:
    """`forkserver.ensure_running()`, a server it starts given `env` (no public way). The caller's `os.environ` is never
    changed: another thread starting a process meanwhile reads it mid-change, and its exec fails (EFAULT, exit code 255)."""
    if not isinstance(forkserver.util, _ServerUtil): forkserver.util = _ServerUtil(forkserver.util)
    forkserver.util.env.value = env
    try: forkserver.ensure_running()
    finally: forkserver.util.env.value = None

def in_spawn_bootstrap() -> bool:
    "True in a spawned child still importing the main module: an unguarded script reaching a launch (no public flag)."
    return bool(getattr(mp.current_process(), '_inheriting', False))

_MAIN_KEYS = ('init_main_from_path', 'init_main_from_name')   # what makes a spawn/forkserver child re-run the main module
_starting = threading.local()

@contextlib.contextmanager
def main_not_rerun():
    """Processes multiprocess starts in this thread meanwhile (spawn, forkserver, and a fork server itself) do not re-run
    the caller's main module (a script, `python -m mod`): its code reaches them by value, as a notebook's does. multiprocess
    has no public switch; `get_preparation_data` is wrapped once, and acts only inside this block, so other pools keep theirs."""
    original = spawn.get_preparation_data
    if not getattr(original, 'mpify_wrapped', False):
        def get_preparation_data(name):
            data = original(name)
            if getattr(_starting, 'active', False):
                for k in _MAIN_KEYS: data.pop(k, None)
            return data
        get_preparation_data.mpify_wrapped = True
        spawn.get_preparation_data = get_preparation_data
    before, _starting.active = getattr(_starting, 'active', False), True
    try: yield
    finally: _starting.active = before

# ---------------------------------------------------------------- torch

def nvml_gpu_count() -> int:
    "GPUs NVML sees, without creating a CUDA context (`torch.cuda.device_count` would, in a process that forks); -1 if unknown."
    try: return sys.modules['torch'].cuda._device_count_nvml()
    except Exception: return -1

def ddp_ignore_parameters(module, names: list[str]) -> None:
    "Tell DistributedDataParallel to skip `module`'s parameters `names` (DDP's public API has no such argument)."
    from torch.nn.parallel import DistributedDataParallel
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)

# ---------------------------------------------------------------- numpy and the standard library

def numpy_frombuffer():
    "numpy's own array rebuilder from a protocol-5 buffer (what `ndarray.__reduce_ex__(5)` names), for a reduction of ours."
    numeric = sys.modules.get('numpy._core.numeric') or sys.modules['numpy.core.numeric']
    return numeric._frombuffer

LRU_CACHE_WRAPPER = functools._lru_cache_wrapper   # the type of an `@lru_cache` function: pickled by value, cache dropped
LRU_CACHE_INFO = functools._CacheInfo              # the named tuple its `cache_info` returns

# ---------------------------------------------------------------- fastai

def valid_metrics(recorder) -> list:
    "The Recorder's validation metrics, loss first, as it reads them at `after_validate` (no public accessor)."
    return list(recorder._valid_mets)

def train_metrics(recorder) -> list:
    "The Recorder's training metrics without its smoothed loss, as it reads them at `after_train` with `train_metrics=True`."
    return list(recorder._train_mets[1:])

def loader_workers(dl) -> int | None:
    "The worker processes a fastai DataLoader's torch loader starts (its `fake_l`), or None where it has none."
    loader = getattr(dl, 'fake_l', None)
    return None if loader is None else loader.num_workers

def set_loader_workers(dl, n: int) -> None:
    loader = getattr(dl, 'fake_l', None)
    if loader is not None: loader.num_workers = n
