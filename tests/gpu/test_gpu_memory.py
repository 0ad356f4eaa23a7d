"""GPU memory around `fit_ddp` (issue 16): when it returns, the notebook process holds no more CUDA memory than
before (its allocator's tensors), the GPU holds no more outside it (no worker context or shared copy left over),
and a second call in a row works the same way. CUDA only: no CPU stand-in."""
from __future__ import annotations
import gc, time
from collections import namedtuple

import pytest
import torch
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy

import mpify_fastai  # noqa: F401  (Learner.fit_ddp)
import fastai_helpers as fh
import gpu_helpers as gh

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gh.HAVE_GPU, reason=f"{gh.NO_GPU}; CUDA memory has no CPU stand-in")]

MiB = 2**20
SLACK = 32 * MiB   # lazily loaded kernels may grow the context a little; a worker's context (>300 MiB) or a stray copy
                   # of the model's weights (68 MiB) may not
Usage = namedtuple('Usage', 'allocated outside')

def usage() -> Usage:
    "This process's live CUDA tensors, and the GPU memory used outside its caching allocator (contexts, other processes)."
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    return Usage(torch.cuda.memory_allocated(), total - free - torch.cuda.memory_reserved())

def settled(base: Usage, timeout: float = 10.) -> Usage:
    "Usage once the outside share is back within SLACK of `base` (exited workers' memory is freed by the driver), or at `timeout`."
    deadline = time.monotonic() + timeout
    while (now := usage()).outside > base.outside + SLACK and time.monotonic() < deadline: time.sleep(0.2)
    return now

def test_fit_ddp_leaves_no_cuda_memory_behind():
    learn = Learner(gh.on_device(fh.digits_dls_plain(1024, 256, bs=128)), gh.wide_mlp(), loss_func=CrossEntropyLossFlat(),
                    metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-4)   # the notebook trained here: weights, grads, Adam state
    state_bytes = sum(v.numel() * v.element_size() for s in learn.opt.state.values() for v in s.values() if torch.is_tensor(v))
    assert state_bytes > 2 * 60 * MiB, "premise: optimizer state of the 68 MB model on the GPU"
    base = usage()
    for call in range(2):
        before = fh.params_of(learn.model)
        learn.fit_ddp(1, 1e-4, nprocs=1, timeout=gh.LAUNCH_TIMEOUT)
        assert len(learn.recorder.values) == 1 and not fh.bitwise_equal(fh.params_of(learn.model), before), f"call {call} did not train"
        assert {str(p.device) for p in learn.model.parameters()} == {str(gh.DEVICE)}
        now = settled(base)
        assert now.allocated <= base.allocated, f"call {call}: {(now.allocated - base.allocated) / MiB:.1f} MiB more CUDA tensors here"
        assert now.outside <= base.outside + SLACK, \
            f"call {call}: {(now.outside - base.outside) / MiB:.1f} MiB more GPU memory used outside this process's allocator"
