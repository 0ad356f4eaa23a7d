"""fastai pieces for the `fit_ddp` tests: small deterministic data and models, and callbacks the DDP workers import.

Workers unpickle what they receive by reference when it lives in an importable module, so callback classes and
learner factories used by the tests live here (tests/ is on sys.path in the caller, and spawn hands sys.path down).
"""
from __future__ import annotations
import os, time
from functools import partial
from pathlib import Path

import torch
from torch import nn
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import SGD

# ---------------------------------------------------------------- data and models

_DIGITS = None

def digits_xy() -> tuple[torch.Tensor, torch.Tensor]:
    "scikit-learn's 8x8 digits as (N,1,8,8) float images in [0,1] and int64 labels, in a fixed shuffled order."
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits
        d = load_digits()
        X, y = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16., torch.tensor(d.target)
        order = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
        _DIGITS = X[order].contiguous(), y[order].contiguous()
    return _DIGITS

def digits_dsets(n_train: int, n_valid: int) -> tuple[list, list]:
    "(train, valid) lists of (image, label): the first `n_valid` digits are the validation set, the next `n_train` the training set."
    X, y = digits_xy()
    ds = list(zip(X, y))
    return ds[n_valid:n_valid + n_train], ds[:n_valid]

def digits_dls_plain(n_train: int, n_valid: int, bs: int, shuffle: bool = False, val_bs: int | None = None) -> DataLoaders:
    "DataLoaders over `digits_dsets(n_train, n_valid)`, `shuffle` for training."
    train, valid = digits_dsets(n_train, n_valid)
    return DataLoaders.from_dsets(train, valid, bs=bs, shuffle=shuffle, val_bs=val_bs or bs)

def mlp(seed: int = 0) -> nn.Module:
    "A small MLP without BatchNorm or dropout: its gradient is a plain mean over the batch."
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

def two_part_model(seed: int = 0) -> nn.Module:
    "A body and a head, for `splitter=body_head_splitter`, so `freeze()` / `fine_tune` have two parameter groups."
    torch.manual_seed(seed)
    return nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU()), nn.Linear(32, 10))

def body_head_splitter(m): return [list(m[0].parameters()), list(m[1].parameters())]

def sgd_learner(dls, model, **kw) -> Learner:
    "A Learner with plain SGD (no momentum, no weight decay) and mean cross-entropy, no progress bars needed."
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=partial(SGD, mom=0.), wd=0., **kw)

def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    "A detached CPU copy of `model`'s state_dict."
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0. for k in a)

def bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

# ---------------------------------------------------------------- learner factories (pickled by reference)

def factory_learner() -> Learner:
    "A zero-argument factory for the function form `fit_ddp(factory, ...)`: same model and data on every call."
    from fastai.metrics import accuracy
    return Learner(digits_dls_plain(512, 200, bs=64, shuffle=True), two_part_model(1), loss_func=CrossEntropyLossFlat(),
                   metrics=accuracy, splitter=body_head_splitter)

# ---------------------------------------------------------------- callbacks the workers run

class FailOnRank(Callback):
    """Raise in `after_batch` of epoch `epoch`, on rank `rank` only (training batches). Before that, rank 0 saves its
    weights at the end of every epoch to `folder/epoch<N>.pth` (what the checkpoint must hold), and the failing
    rank writes the wall-clock time of the failure to `folder/failed_at`."""
    order = 70
    def __init__(self, folder: str, rank: int = 1, epoch: int = 1):
        self.folder,self.fail_rank,self.fail_epoch = str(folder),rank,epoch
    @property
    def _rank(self) -> int: return int(os.environ.get('RANK', 0))
    def after_batch(self):
        if self.training and self.epoch == self.fail_epoch and self._rank == self.fail_rank:
            Path(self.folder, 'failed_at').write_text(repr(time.time()))
            raise RuntimeError(f"planned failure on rank {self._rank} in epoch {self.epoch}, batch {self.iter}")
    def after_epoch(self):
        if self._rank == 0:
            m = getattr(self.model, 'module', self.model)
            torch.save({k: v.detach().cpu().clone() for k, v in m.state_dict().items()},
                       Path(self.folder, f'epoch{self.epoch}.pth'))

class RecordFits(Callback):
    "Rank 0 appends one line per fit to `folder/fits.txt`: n_epoch, trainable and total parameter counts (shows freeze/unfreeze)."
    order = 70
    def __init__(self, folder: str): self.folder = str(folder)
    def before_fit(self):
        if int(os.environ.get('RANK', 0)): return
        m = getattr(self.model, 'module', self.model)
        trainable, total = sum(p.numel() for p in m.parameters() if p.requires_grad), sum(p.numel() for p in m.parameters())
        with open(Path(self.folder, 'fits.txt'), 'a') as f: f.write(f"{self.n_epoch} {trainable} {total}\n")

class RecordWorld(Callback):
    "Write each rank's (rank, world size, number of training batches, epochs run) to `folder/rank<R>.txt` at the end of fit."
    order = 70
    def __init__(self, folder: str): self.folder,self.n_batches = str(folder),0
    def before_fit(self): self.n_batches,self.epochs = 0,0
    def after_batch(self):
        if self.training: self.n_batches += 1
    def before_epoch(self): self.epochs += 1
    def after_fit(self):
        r = os.environ.get('RANK', '0')
        Path(self.folder, f'rank{r}.txt').write_text(f"{r} {os.environ.get('WORLD_SIZE', '1')} {self.n_batches} {self.epochs}")
