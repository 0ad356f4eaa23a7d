"""A kernel restarted (SIGKILLed) during `fit_ddp` leaves nothing behind: its workers go, and the /dev/shm memory that
held the call's 200 MB payload is freed with them, without waiting for another call. A real Jupyter kernel."""
from __future__ import annotations
import shutil, time
import pytest
import helpers

TRAIN = '''
import torch, mpify_fastai
from torch import nn
from torch.utils.data import TensorDataset
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
X = torch.randn(200_000, 250)                     # 200 MB of float32: the call's payload
y = (X[:, 0] > 0).long()
dls = DataLoaders.from_dsets(TensorDataset(X[:190_000], y[:190_000]), TensorDataset(X[190_000:], y[190_000:]),
                             bs=1000, num_workers=0)
learn = Learner(dls, nn.Linear(250, 2), loss_func=CrossEntropyLossFlat())
learn.fit_ddp(200, 1e-3, nprocs=2)
'''

def _shm_used() -> int: return shutil.disk_usage(helpers.SHM).used

def _descendants(pid: int) -> list[int]:
    kids, todo = [], [pid]
    while todo:
        todo += (new := [c['pid'] for c in helpers.children_of(todo.pop())])
        kids += new
    return kids

def test_kernel_restart_during_fit_ddp_frees_the_payload():
    from jupyter_client import KernelManager
    km = KernelManager(kernel_name='python3')
    km.start_kernel(env=helpers.kernel_env(), cwd=str(helpers.REPO))
    kc = km.client(); kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        kernel = km.provisioner.process.pid
        base = _shm_used()
        kc.execute(TRAIN)
        deadline, workers, held = time.monotonic() + 120, [], set()
        while time.monotonic() < deadline:   # until both ranks hold the payload, which sits in /dev/shm
            workers = [p for p in _descendants(kernel) if 'mpify' in helpers._cmdline(p) or helpers.shm_files_held(p)]
            held = set().union(*(helpers.shm_files_held(p) for p in workers)) if workers else set()
            if len([p for p in workers if helpers.shm_files_held(p)]) >= 2 and _shm_used() - base > 150e6: break
            time.sleep(0.2)
        else: pytest.fail(f"the fit never got going: workers {workers}, /dev/shm +{(_shm_used() - base) / 1e6:.0f} MB")
        assert all(f.endswith('(deleted)') for f in held), held    # no name in /dev/shm to leave behind
        t = time.monotonic()
        km.restart_kernel(now=True)                                 # SIGKILL, as Jupyter's restart does
        while time.monotonic() - t < 15 and (any(helpers.alive(p) and helpers.proc_state(p) != 'Z' for p in workers)
                                             or _shm_used() - base > 30e6):
            time.sleep(0.1)
        freed_after = time.monotonic() - t
        assert not [p for p in workers if helpers.alive(p) and helpers.proc_state(p) != 'Z'], "workers outlived the kernel"
        assert _shm_used() - base < 30e6, f"/dev/shm still holds {(_shm_used() - base) / 1e6:.0f} MB after the restart"
        assert helpers.shm_holders(held) == [] and [p for p in helpers.scratch_of(kernel) if p.startswith(helpers.SHM)] == []
        assert freed_after < 15
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
