"""The CUDA-safety the GPU path rests on, checked on any machine (issue 16): the warm fork server's preload and the
caller's GPU count never initialise CUDA. Here (no GPU) `torch.cuda.is_initialized()` is False whatever happens, so
these tests record the calls themselves: `tests/gpu/cuda_probe.py`, imported before torch, wraps every function that
would reach the CUDA runtime or driver (`torch._C._cuda_init`, `_cuda_getDeviceCount`, ..., `torch.cuda._lazy_init`).
"""
from __future__ import annotations
import json, os, subprocess, sys

import multiprocess as mp
from multiprocess import forkserver

import helpers

GPU_TESTS = helpers.TESTS / 'gpu'

def _calls(res: dict) -> str: return '\n'.join(f"{c['name']} (NVML check {c['nvml_check']}) from\n{c['stack']}" for c in res['calls'])

def test_warm_server_preload_never_initialises_cuda(monkeypatch, no_leftovers):
    """A fork server started as warm.py starts it, for a fastai session, with the probe preloaded first: nothing in
    the preload calls into CUDA, a process forked from it finds CUDA untouched, and the server checks availability
    through NVML (so a later `torch.cuda.is_available()` there would not initialise CUDA either)."""
    import torch, fastai.basics  # noqa: F401  (a fastai session: the server preloads torch and fastai too)
    from mpify_fastai import warm
    # the server imports the probe by name from PYTHONPATH (multiprocess's forkserver ignores the caller's sys.path)
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(GPU_TESTS), *filter(None, [os.environ.get('PYTHONPATH')])]))
    monkeypatch.syspath_prepend(str(GPU_TESTS))
    import cuda_probe                              # torch is loaded here already: this wraps nothing in this process
    assert not cuda_probe.report()['hooked']
    preload = ['cuda_probe', *warm.warm_preload()]
    assert {'torch', 'fastai.basics', 'mpify_fastai.training', 'torch._dynamo'} <= set(preload)
    saved = forkserver._forkserver._preload_modules
    warm.stop_warm_server()
    try:
        forkserver.set_forkserver_preload(preload)
        forkserver.ensure_running()
        server = forkserver._forkserver._forkserver_pid
        here, there = mp.Pipe(duplex=False)
        p = mp.get_context('forkserver').Process(target=cuda_probe.send_report, args=(there,))
        p.start(); there.close()
        assert here.poll(240), "the forked process sent no report"
        res = here.recv()
        p.join(30)
    finally:
        warm.stop_warm_server()                    # the next warm launch starts a normal server
        forkserver._forkserver._preload_modules = saved
    assert res['ppid'] == server and res['hooked'] and res['torch'], f"premise: forked from the probed server, torch loaded: {res}"
    assert not res['calls'], f"the fork server's preload called into CUDA:\n{_calls(res)}"
    assert (res['initialized'], res['cached_device_count'], res['nvml_check']) == (False, None, '1'), res

def test_caller_counts_gpus_without_initialising_cuda():
    "`import mpify_fastai` and `visible_gpu_count()` (what a launch runs in the caller) in a fresh interpreter: no CUDA call."
    code = ("import json, cuda_probe, mpify_fastai\nfrom mpify_fastai.group import visible_gpu_count\n"
            "n = visible_gpu_count()\nprint(json.dumps(dict(cuda_probe.report(), n=n)))")
    env = helpers.subprocess_env(MPIFY_PREWARM='0')
    env['PYTHONPATH'] = os.pathsep.join([str(GPU_TESTS), env['PYTHONPATH']])
    env.pop('PYTORCH_NVML_BASED_CUDA_CHECK', None)
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.splitlines()[-1])
    assert res['hooked'] and res['torch'] and isinstance(res['n'], int), res
    assert not res['calls'], f"the caller called into CUDA:\n{_calls(res)}"
    assert res['initialized'] is False
