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

__all__ = ['warm_context', 'warm_preload', 'stop_warm_server', 'prewarm']

_lock = threading.Lock()
_started_with: tuple[str, ...] | None = None

def warm_preload() -> tuple[str, ...]:
    "Modules the server imports: our launcher, torch if the caller has it, fastai's core if the caller has it."
    mods = ['mpify_fastai.launch']
    if 'torch' in sys.modules: mods.append('torch')
    if 'fastai' in sys.modules:   # torch._dynamo: DistributedDataParallel imports it (~900 modules) on first use
        mods += ['fastai.basics', 'fastai.callback.schedule', 'mpify_fastai.callback', 'torch._dynamo']
    return tuple(mods)

def _server_alive() -> bool:
    "Whether the fork server runs; read from /proc, never by reaping it (multiprocess reaps it itself on restart)."
    pid = getattr(forkserver._forkserver, '_forkserver_pid', None)
    if pid is None: return False
    try:
        with open(f'/proc/{pid}/stat') as f: state = f.read().rsplit(')', 1)[1].split()[0]
    except OSError: return False
    return state not in ('Z', 'X')

def stop_warm_server() -> None:
    "Stop the fork server now (the next warm launch starts a new one)."
    global _started_with
    with _lock:
        if getattr(forkserver._forkserver, '_forkserver_pid', None) is not None: forkserver._forkserver._stop()
        _started_with = None

def warm_context():
    """The multiprocess 'forkserver' context, its server started (or restarted) with `warm_preload()`.
    A server missing modules the caller now uses is replaced, so it always holds what workers need."""
    global _started_with
    want = warm_preload()
    with _lock:
        alive = _server_alive()
        if alive and _started_with is not None and set(want) <= set(_started_with): return mp.get_context('forkserver')
        if alive or getattr(forkserver._forkserver, '_forkserver_pid', None) is not None: forkserver._forkserver._stop()
        forkserver.set_forkserver_preload(list(want))
        # a CUDA availability probe in the server must not init CUDA; the server must not pre-warm a server itself
        server_env = {'PYTORCH_NVML_BASED_CUDA_CHECK': '1', 'MPIFY_PREWARM': '0'}
        old = {k: os.environ.get(k) for k in server_env}
        os.environ.update(server_env)
        try: forkserver.ensure_running()
        finally:
            for k, v in old.items():
                if v is None: os.environ.pop(k, None)
                else: os.environ[k] = v
        _started_with = want
    return mp.get_context('forkserver')

def prewarm() -> threading.Thread | None:
    """Start the fork server in the background now, so the first launch of the session finds it ready.
    Done on `import mpify_fastai` in a torch session's main process; `MPIFY_PREWARM=0` turns it off."""
    if os.environ.get('MPIFY_PREWARM', '1') == '0' or 'RANK' in os.environ: return None   # a worker, or under torchrun
    if mp.parent_process() is not None or getattr(mp.current_process(), '_inheriting', False): return None
    def run():
        try: warm_context()
        except Exception: pass      # the first launch starts it again and reports what goes wrong
    t = threading.Thread(target=run, name='mpify-prewarm', daemon=True)
    t.start()
    return t
