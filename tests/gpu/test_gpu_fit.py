"""`fit_ddp` on a GPU (issue 16): one rank on NCCL against a local GPU fit, two ranks sharing one GPU over gloo with
SyncBatchNorm, and `to_fp16` under DDP. Every rank records what it ran with (backend, device, layer types,
autocast); each fit's last metrics equal the notebook's `learn.validate()`.

Skipped without a GPU; `MPIFY_GPU_SUITE_ON_CPU=1` runs the first two on the CPU over gloo (no SyncBatchNorm there).
"""
from __future__ import annotations
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastai.callback.fp16 import MixedPrecision
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy

import mpify_fastai  # noqa: F401  (Learner.fit_ddp)
from mpify_fastai.demo import digits_cnn
import fastai_helpers as fh
import gpu_helpers as gh

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gh.RUNS, reason=gh.NO_GPU)]
cuda_only = pytest.mark.skipif(not gh.HAVE_GPU, reason=f"{gh.NO_GPU}; a CUDA-only feature has no CPU stand-in")
DEV = str(gh.DEVICE)

def _device_of(learn) -> str: return str(next(learn.model.parameters()).device)

def _validates_as_recorded(learn) -> None:
    last = [float(v) for v in learn.recorder.values[-1]]    # validate() rewrites the last row in place: copy it first
    val = [float(v) for v in learn.validate()]
    np.testing.assert_allclose(val, last[1:], atol=1e-4, rtol=0, err_msg="last recorded metrics != learn.validate()")

def test_one_rank_on_nccl_trains_exactly_like_a_local_gpu_fit(tmp_path):
    "fit_ddp(nprocs=1) runs NCCL on GPU 0 and gives the weights and history of a local fit on the same GPU (1e-5)."
    dls = lambda: gh.on_device(fh.digits_dls_plain(512, 256, bs=64))
    a, b = fh.sgd_learner(dls(), fh.mlp(0), metrics=accuracy), fh.sgd_learner(dls(), fh.mlp(0), metrics=accuracy)
    a.fit_ddp(2, 0.1, nprocs=1, timeout=gh.LAUNCH_TIMEOUT, cbs=[gh.ExactKernels(), gh.RecordRun(tmp_path)])
    with b.no_bar(), b.no_logging(): b.fit(2, 0.1, cbs=gh.ExactKernels())

    [run] = gh.read_runs(tmp_path, 1)
    # one rank trains its plain module: DDP has nothing to average there, only per-step cost
    assert (run['backend'], run['world'], run['device'], run['ddp']) == ('nccl' if gh.HAVE_GPU else 'gloo', 1, DEV, False), run
    assert fh.max_abs_diff(fh.params_of(a.model), fh.params_of(b.model)) < 1e-5
    va, vb = np.array(a.recorder.values, dtype=float), np.array(b.recorder.values, dtype=float)
    assert va.shape == vb.shape == (2, 3)
    np.testing.assert_allclose(va, vb, atol=1e-5, rtol=0)
    assert _device_of(a) == _device_of(b) == DEV, "after fit_ddp the model is not where a local fit leaves it"
    _validates_as_recorded(a)

def test_two_ranks_on_one_gpu_over_gloo_with_sync_batchnorm(tmp_path):
    """devices=[0, 0]: two ranks share GPU 0 over gloo (NCCL needs one GPU per rank). With sync_bn (the default) they
    normalise with the statistics of the whole step's batch, so one step of 2 ranks x B samples equals one local step
    over all 2B, BatchNorm running statistics included; BatchNorm per rank gives other weights. The notebook's model
    keeps plain BatchNorm, and its state loads into a fresh model.
    CPU stand-in: no SyncBatchNorm there, so the step must equal the per-rank-BatchNorm reference instead."""
    B, lr = 64, 0.5
    train, valid = fh.digits_dsets(2 * B, 256)
    init = (torch.manual_seed(0), digits_cnn())[1]
    def learner(bs):   # the model on the notebook's device already: where it comes back to is the first test's business
        return fh.sgd_learner(gh.on_device(DataLoaders.from_dsets(train, valid, bs=bs, shuffle=False)),
                              copy.deepcopy(init).to(gh.DEVICE), metrics=accuracy)

    learn = learner(B)
    learn.fit_ddp(1, lr, nprocs=2, devices=[0, 0] if gh.HAVE_GPU else None, timeout=gh.LAUNCH_TIMEOUT,
                  cbs=[gh.ExactKernels(), gh.RecordRun(tmp_path)])
    runs = gh.read_runs(tmp_path, 2)
    norms = ['SyncBatchNorm'] if gh.HAVE_GPU else ['BatchNorm2d']
    assert [(r['backend'], r['world'], r['device'], r['ddp'], r['norms']) for r in runs] == [('gloo', 2, DEV, True, norms)] * 2, runs

    with gh.exact_kernels():
        full = learner(2 * B)                      # one local step over all 2B samples
        with full.no_bar(), full.no_logging(): full.fit(1, lr)
        m = copy.deepcopy(init).to(gh.DEVICE).train()  # ranks with their own BatchNorm statistics: even and odd samples
        x, y = torch.stack([t[0] for t in train]).to(gh.DEVICE), torch.stack([t[1] for t in train]).to(gh.DEVICE)
        ((F.cross_entropy(m(x[0::2]), y[0::2]) + F.cross_entropy(m(x[1::2]), y[1::2])) / 2).backward()
        with torch.no_grad():
            for p in m.parameters(): p -= lr * p.grad
    weights = lambda model: {k: v.detach().cpu() for k, v in model.named_parameters()}
    assert fh.max_abs_diff(weights(full.model), weights(m)) > 1e-3, "premise: per-rank BatchNorm must change the step"
    if gh.HAVE_GPU: assert fh.max_abs_diff(fh.params_of(learn.model), fh.params_of(full.model)) < 1e-5
    else: assert fh.max_abs_diff(weights(learn.model), weights(m)) < 1e-5

    assert {type(l).__name__ for l in learn.model.modules() if isinstance(l, torch.nn.modules.batchnorm._NormBase)} == {'BatchNorm2d'}
    torch.save(learn.model.state_dict(), tmp_path / 'model.pth')
    fresh = digits_cnn()
    fresh.load_state_dict(torch.load(tmp_path / 'model.pth'))
    with gh.exact_kernels(), torch.no_grad():
        assert torch.equal(fresh.to(gh.DEVICE).eval()(x), learn.model.eval()(x))
    _validates_as_recorded(learn)

@cuda_only
def test_to_fp16_under_ddp(tmp_path):
    """learn.to_fp16(): rank 0 trains under fp16 autocast with a grad scaler on NCCL, as well as a local fp16 fit does;
    fp32 weights come home, still fp16-enabled."""
    init = (torch.manual_seed(0), digits_cnn())[1]
    def learner(): return Learner(gh.on_device(fh.digits_dls_plain(768, 256, bs=64, shuffle=True)),
                                  copy.deepcopy(init).to(gh.DEVICE), loss_func=CrossEntropyLossFlat(), metrics=accuracy).to_fp16()
    learn, local = learner(), learner()
    learn.fit_ddp(2, 1e-2, nprocs=1, timeout=gh.LAUNCH_TIMEOUT, cbs=gh.RecordRun(tmp_path))
    with local.no_bar(), local.no_logging(): local.fit(2, 1e-2)
    [run] = gh.read_runs(tmp_path, 1)
    assert (run['backend'], run['device'], run['pred_dtype'], run['autocast'], run['scaler']) == \
        ('nccl', DEV, 'float16', True, 'GradScaler'), run
    assert {(str(p.device), p.dtype) for p in learn.model.parameters()} == {(DEV, torch.float32)}
    assert any(isinstance(cb, MixedPrecision) for cb in learn.cbs)
    rows, local_rows = (np.array(l.recorder.values, dtype=float) for l in (learn, local))
    assert rows.shape == (2, 3) and np.isfinite(rows).all() and rows[1, 1] < rows[0, 1], rows
    # the shuffled order differs from the local fit's (each run draws its own seed): the same learning, not the same numbers
    assert abs(rows[-1, 1] - local_rows[-1, 1]) < 0.15 * local_rows[-1, 1], (rows, local_rows)
    _validates_as_recorded(learn)
