"""`split_batches=True` on a GPU (issue 32): SyncBatchNorm normalizes each rank's part of a batch with the whole local
batch's statistics, so a split fit of a model with BatchNorm equals a local GPU fit, running statistics included.

CUDA only: on CPU ranks torch's SyncBatchNorm does not run (`tests/test_split_batches.py` pins what holds there).
"""
from __future__ import annotations
import copy

import numpy as np
import pytest
import torch
from fastai.data.core import DataLoaders, TfmdDL
from fastai.metrics import accuracy

import mpify_fastai  # noqa: F401  (Learner.fit_ddp)
from mpify_fastai.demo import digits_cnn
import fastai_helpers as fh
import gpu_helpers as gh

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gh.HAVE_GPU, reason=f"{gh.NO_GPU}; SyncBatchNorm runs on GPUs only")]

def test_split_batches_with_sync_batchnorm_equal_a_local_gpu_fit(tmp_path):
    """A BatchNorm CNN, SGD, bs 50 on 130 items (parts of 25 and, in the last batch, 15 per rank): `nprocs=1` on NCCL, and
    two ranks sharing GPU 0 over gloo with SyncBatchNorm, give the weights, BatchNorm statistics and rows of a local GPU
    fit (1e-5)."""
    train, valid = fh.digits_dsets(130, 256)
    init = (torch.manual_seed(0), digits_cnn())[1]
    def learner():
        dls = DataLoaders(TfmdDL(train, bs=50, drop_last=False), TfmdDL(valid, bs=64))
        return fh.sgd_learner(gh.on_device(dls), copy.deepcopy(init).to(gh.DEVICE), metrics=accuracy)
    local = learner()
    with gh.exact_kernels(), local.no_bar(), local.no_logging(): local.fit(2, 0.1)
    for nprocs, devices, backend, norms in ((1, None, 'nccl', ['BatchNorm2d']), (2, [0, 0], 'gloo', ['SyncBatchNorm'])):
        (folder := tmp_path / str(nprocs)).mkdir()
        learn = learner()
        learn.fit_ddp(2, 0.1, nprocs=nprocs, devices=devices, split_batches=True, timeout=gh.LAUNCH_TIMEOUT,
                      cbs=[gh.ExactKernels(), gh.RecordRun(folder)])
        runs = gh.read_runs(folder, nprocs)
        assert [(r['backend'], r['world'], r['norms']) for r in runs] == [(backend, nprocs, norms)] * nprocs, runs
        assert fh.max_abs_diff(fh.params_of(learn.model), fh.params_of(local.model)) < 1e-5, f"nprocs={nprocs}"
        np.testing.assert_allclose(np.array(learn.recorder.values, dtype=float), np.array(local.recorder.values, dtype=float),
                                   atol=1e-5, rtol=0, err_msg=f"nprocs={nprocs}")
