"""What the GPU suite's DDP workers import by name (callbacks that record what ran where and how fast), and the
suite's device, data and models.

`MPIFY_GPU_SUITE_ON_CPU=1` runs the cases that mean something on a CPU there (gloo instead of NCCL): a check of the
tests themselves on a machine without a GPU. `MPIFY_GPU_REPORT_DIR` is where the throughput figure is written.
"""
from __future__ import annotations
import json, os, time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader

ON_CPU = os.environ.get('MPIFY_GPU_SUITE_ON_CPU') == '1'
NO_GPU = "needs a CUDA GPU (torch.cuda.is_available() is False here)"

def gpu_count() -> int:
    "Visible CUDA GPUs, counted through NVML as the package counts them: no CUDA context in this process."
    from mpify_fastai.group import visible_gpu_count
    return visible_gpu_count()

HAVE_GPU = not ON_CPU and gpu_count() > 0
RUNS = HAVE_GPU or ON_CPU           # the suite runs here: on the GPU, or on the CPU stand-in
DEVICE = torch.device('cuda', 0) if HAVE_GPU else torch.device('cpu')
LAUNCH_TIMEOUT = 120   # seconds for each fit_ddp: a hung collective fails its test, with its workers stopped, in time for the rest

def on_device(dls: DataLoaders) -> DataLoaders:
    "`dls`, set to yield its batches on the suite's device."
    dls.device = DEVICE
    return dls

@contextmanager
def exact_kernels():
    "Plain fp32 (no TF32) and deterministic cudnn kernels while the block runs; the previous settings after it."
    b = torch.backends
    saved = b.cudnn.deterministic, b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32
    b.cudnn.deterministic, b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = True, False, False, False
    try: yield
    finally: b.cudnn.deterministic, b.cudnn.benchmark, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = saved

class ExactKernels(Callback):
    "`exact_kernels` around a fit: in a DDP worker, where the caller's backend settings do not reach."
    def before_fit(self): self.ctx = exact_kernels(); self.ctx.__enter__()
    def after_fit(self): self.ctx.__exit__(None, None, None)

def _rank() -> int: return int(os.environ.get('RANK', 0))

class RecordRun(Callback):
    """At its first training batch each rank writes `folder/rank<R>.json`: group backend and size, whether the model is
    wrapped in DistributedDataParallel, parameter device, normalisation layer types, prediction dtype, autocast and grad scaler."""
    order = 5   # its after_pred runs before MixedPrecision's (10), which turns the prediction back into fp32
    def __init__(self, folder): self.folder = str(folder)
    def before_fit(self): self.done = False
    def after_pred(self):
        if self.done or not self.training: return
        import torch.distributed as dist
        self.done = True
        m = getattr(self.model, 'module', self.model)
        dev = next(m.parameters()).device
        group = dist.is_available() and dist.is_initialized()
        rec = dict(rank=_rank(), world=dist.get_world_size() if group else 1, backend=dist.get_backend() if group else None,
                   ddp=isinstance(self.model, nn.parallel.DistributedDataParallel), device=str(dev),
                   norms=sorted({type(x).__name__ for x in m.modules() if isinstance(x, nn.modules.batchnorm._NormBase)}),
                   pred_dtype=str(self.pred.dtype).replace('torch.', ''), autocast=torch.is_autocast_enabled(dev.type),
                   scaler=type(getattr(self.learn, 'scaler', None)).__name__)
        Path(self.folder, f'rank{rec["rank"]}.json').write_text(json.dumps(rec))

def read_runs(folder, nprocs: int) -> list[dict]:
    return [json.loads(Path(folder, f'rank{r}.json').read_text()) for r in range(nprocs)]

class EpochTimes(Callback):
    """Rank 0 writes the wall time of every epoch of the fits it joins (both of `fine_tune`'s) to `path` (JSON list,
    seconds): from one epoch's start to the next one's (a fit's last: to its end), validation and per-epoch work
    included, queued GPU work finished."""
    order = 100
    def __init__(self, path): self.path, self.times = str(path), []
    def _mark(self):
        if self.dls.device is not None and torch.device(self.dls.device).type == 'cuda': torch.cuda.synchronize()
        self.marks.append(time.perf_counter())
    def before_fit(self): self.marks = []
    def before_epoch(self): self._mark()
    def after_fit(self):
        self._mark()
        self.times += [b - a for a, b in zip(self.marks, self.marks[1:])]
        if _rank() == 0: Path(self.path).write_text(json.dumps(self.times))

class FirstBatch(Callback):
    "Rank 0 writes the wall-clock time (`time.time()`) of the first training batch of the fits it joins to `path`."
    def __init__(self, path): self.path, self.done = str(path), False
    def before_batch(self):
        if self.done or not self.training: return
        self.done = True
        if _rank() == 0: Path(self.path).write_text(json.dumps(time.time()))

# ---------------------------------------------------------------- data and models

class SyntheticBatches:
    """`n` ready-made batches of `bs` random 3x32x32 images and labels, cycling through `distinct` stored ones: a
    dataset for `DataLoader(bs=None)`, so batches cost no per-item collation (the GPU's work is what gets timed)."""
    def __init__(self, n: int, bs: int, distinct: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.n, self.x, self.y = n, torch.randn(distinct, bs, 3, 32, 32, generator=g), torch.randint(0, 10, (distinct, bs), generator=g)
    def __len__(self): return self.n
    def __getitem__(self, i): return self.x[i % len(self.x)], self.y[i % len(self.y)]

def synthetic_dls(n_train: int, n_valid: int, bs: int) -> DataLoaders:
    "Pre-batched synthetic DataLoaders on the suite's device (in a fixed order)."
    return on_device(DataLoaders(DataLoader(SyntheticBatches(n_train, bs), bs=None),
                                 DataLoader(SyntheticBatches(n_valid, bs, seed=1), bs=None)))

def small_cnn(width: int = 64, seed: int = 0) -> nn.Module:
    "Five 3x3 conv/BatchNorm/ReLU blocks (two of stride 2), pooled into a linear head: a small CNN for 3x32x32 images."
    torch.manual_seed(seed)
    def block(i, o, s): return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
    w = width
    return nn.Sequential(*block(3, w, 1), *block(w, w, 1), *block(w, 2 * w, 2), *block(2 * w, 2 * w, 1), *block(2 * w, 4 * w, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 10))

def wide_mlp(hidden: int = 4096, seed: int = 0) -> nn.Module:
    "An MLP for 8x8 digits with a hidden x hidden layer: 17 M parameters (68 MB) at the default width."
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))

def write_report(name: str, data: dict) -> None:
    "Save `data` as `name`.json in `MPIFY_GPU_REPORT_DIR` (where run.sh gathers the figures), if it is set."
    folder = os.environ.get('MPIFY_GPU_REPORT_DIR')
    if folder: Path(folder, f'{name}.json').write_text(json.dumps(data, indent=1))
