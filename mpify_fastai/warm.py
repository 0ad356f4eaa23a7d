"""Warm launches: one fork server per caller with torch (and fastai, if the caller uses it) already imported.

Workers fork from it in milliseconds instead of re-importing torch and fastai for seconds each. The server
never runs torch code, so it holds no CUDA context and every forked worker still creates its own: the
speed of fork with the safety of spawn. It is multiprocess's fork server: it exits when the caller's end of
its pipe closes (caller exit or SIGKILL alike), and is started again on the next call if it died.
"""
from __future__ import annotations
import os, sys, threading
import multiprocess as mp
from multiprocess import forkserver
from ._private import forkserver_pid, in_spawn_bootstrap, main_not_rerun, start_forkserver, stop_forkserver
from .procfs import process_state

__all__ = ['warm_context', 'warm_ready', 'mark_ready', 'warm_preload', 'stop_warm_server', 'prewarm']

_lock = threading.Lock()
_started_with: tuple[str, ...] | None = None
_prewarming: threading.Thread | None = None
_ready = threading.Event()      # set once the current server has served a fork, i.e. finished its imports

def warm_preload() -> tuple[str, ...]:
    "Modules the server imports: our launcher, torch if the caller has it, fastai's core if the caller has it."
    mods = ['mpify_fastai._server_init', 'mpify_fastai.worker']
    if 'torch' in sys.modules: mods.append('torch')
    if 'fastai' in sys.modules:   # torch._dynamo: DistributedDataParallel imports it (~900 modules) on first use
        mods += ['fastai.basics', 'fastai.callback.schedule', 'mpify_fastai.training', 'torch._dynamo']
    return tuple(mods)

def forkserver_alive() -> bool:
    "Whether the fork server runs; read from /proc, never by reaping it (multiprocess reaps it itself on restart)."
    pid = forkserver_pid()
    return pid is not None and process_state(pid) not in (None, 'Z', 'X')

def mark_ready() -> None:
    "A launch from the current server succeeded: it has finished its imports."
    _ready.set()

def warm_ready() -> bool:
    "Whether a server with everything the caller now uses has finished its imports (a launch would not wait)."
    return _ready.is_set() and forkserver_alive() and _started_with is not None and set(warm_preload()) <= set(_started_with)

def stop_warm_server() -> None:
    "Stop the fork server now (the next warm launch starts a new one)."
    global _started_with
    with _lock:
        stop_forkserver()
        _started_with = None

def _server_env() -> dict[str, str]:
    """The server's environment: the caller's, with PYTHONPATH its `sys.path` (a checkout added at run time, a notebook's
    folder), since multiprocess's server does not apply the path it is given and skips a preload it cannot import."""
    return {**os.environ, 'PYTHONPATH': os.pathsep.join(p for p in sys.path if p)}

def warm_context():
    """The multiprocess 'forkserver' context, its server started (or restarted) with `warm_preload()`.
    A server missing modules the caller now uses is replaced, so it always holds what workers need."""
    global _started_with
    want = warm_preload()
    with _lock:
        alive = forkserver_alive()
        if alive and _started_with is not None and set(want) <= set(_started_with): return mp.get_context('forkserver')
        stop_forkserver()
        _ready.clear()
        forkserver.set_forkserver_preload(list(want))
        start_forkserver(_server_env())
        _started_with = want
    return mp.get_context('forkserver')

def _noop(): pass

def prewarm() -> threading.Thread | None:
    """Start the fork server in the background now (unless one is starting), so a later launch finds it ready.
    Done on `import mpify_fastai` in a torch session's main process; `MPIFY_PREWARM=0` turns it off."""
    global _prewarming
    if os.environ.get('MPIFY_PREWARM', '1') == '0' or {'RANK', 'SUBMITIT_EXECUTOR'} & set(os.environ):
        return None   # a worker, or a rank under torchrun or in a submitit job: never a launcher
    if mp.parent_process() is not None or in_spawn_bootstrap(): return None
    if _prewarming is not None and _prewarming.is_alive(): return _prewarming
    def run():
        try:
            ctx = warm_context()
            with main_not_rerun():   # a script's top level never runs in the probe
                p = ctx.Process(target=_noop, name='mpify-prewarm-probe')
                p.start()
            p.join()                # returns once the server has finished importing and forked
            _ready.set()
        except Exception: pass      # the first launch starts it again and reports what goes wrong
    _prewarming = threading.Thread(target=run, name='mpify-prewarm', daemon=True)
    _prewarming.start()
    return _prewarming
