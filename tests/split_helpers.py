"""Learners and worker functions for the `split_batches` tests (`test_split_batches.py`). They live in a module so that
workers import them by reference.

Each case is a deterministic Learner (no dropout, no BatchNorm, no augmentation, unshuffled digits) and a schedule: the
same factory trains locally in the test and under DDP in the workers, and the two must agree.
"""
from __future__ import annotations
import json, os, random
from functools import partial
from pathlib import Path

import torch
from torch import nn
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.training import GradientAccumulation
from fastai.data.core import DataLoaders, TfmdDL
from fastai.learner import Learner, Metric
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.optimizer import SGD, Adam
from fastai.torch_core import set_seed
from fastai.data.transforms import Transform
import fastai.callback.schedule  # noqa: F401  (fit_one_cycle, lr_find)

import fastai_helpers as fh

# name: (n_train, bs, optimizer, schedule, epochs, lr, extra callbacks)
CASES = {
    'sgd_fit_uneven_last': (200, 32, 'sgd', 'fit', 2, 0.2, ()),           # 6 batches of 32 and one of 8
    'adam_one_cycle_bs27': (211, 27, 'adam', 'fit_one_cycle', 2, 1e-2, ()),  # bs no multiple of 2 or 4; last batch 22
    'sgd_grad_accumulation': (150, 16, 'sgd', 'fit', 2, 0.1, ('acc',)),   # steps every 40 items: 3 batches; last batch 6
    'adam_last_batch_of_one_bs3': (31, 3, 'adam', 'fit', 2, 1e-2, ()),    # bs < 4 ranks, and a last batch of 1 item
}

def case_learner(name: str) -> Learner:
    "The Learner of case `name`: same weights, data and order on every call; `train_metrics` so training rows are checked too."
    n_train, bs, opt, *_ = CASES[name]
    opt_func = partial(SGD, mom=0.9) if opt == 'sgd' else Adam
    train, valid = fh.digits_dsets(n_train, 60)
    # the last batch kept: uneven. No loader worker processes: these cases pin the split's arithmetic (loader workers have
    # their own test), and a loader worker forked in a rank hung once in CI on Python 3.10 / torch 2.6 (open, see the notes)
    dls = DataLoaders(TfmdDL(train, bs=bs, drop_last=False, num_workers=0), TfmdDL(valid, bs=12, num_workers=0))
    learn = Learner(dls, fh.mlp(3), loss_func=CrossEntropyLossFlat(),
                    opt_func=opt_func, metrics=accuracy, wd=0.01)
    learn.recorder.train_metrics = True
    return learn

def case_callbacks(name: str) -> list:
    return [GradientAccumulation(n_acc=40)] if 'acc' in CASES[name][-1] else []

def run_case(learn: Learner, name: str) -> None:
    "Case `name`'s schedule on `learn` (locally, or in a worker under the runner)."
    _, _, _, schedule, epochs, lr, _ = CASES[name]
    with learn.no_bar(), learn.no_logging(): getattr(learn, schedule)(epochs, lr, cbs=case_callbacks(name))

def fit_cases_in_worker(names: list[str]) -> dict:
    "In each rank of an `in_torchddp` group: every case trained as `fit_ddp(split_batches=True)` trains it; rank 0's results."
    from mpify_fastai.group import rank_world
    from mpify_fastai.state import learner_result
    from mpify_fastai.training import DDPOptions, fit_distributed
    out = {}
    for name in names:
        learn = case_learner(name)
        _, _, _, schedule, epochs, lr, _ = CASES[name]
        with learn.no_bar(), learn.no_logging():
            fit_distributed(learn, schedule, (epochs, lr), {'cbs': case_callbacks(name)}, DDPOptions(split_batches=True))
        out[name] = learner_result(learn)
    return out if rank_world()[0] == 0 else None

def local_result(name: str) -> dict:
    "Case `name` trained locally, as `learner_result` reports it."
    from mpify_fastai.state import learner_result
    learn = case_learner(name)
    run_case(learn, name)
    return learner_result(learn)

# ---------------------------------------------------------------- BatchNorm on CPU ranks

def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))

def bn_learner() -> Learner:
    "One batch of 16 items, plain SGD: one step."
    return fh.sgd_learner(fh.digits_dls_plain(16, 32, bs=16), bn_model())

def bn_step_in_worker(split_batches: bool) -> dict | None:
    from mpify_fastai.group import rank_world
    from mpify_fastai.state import learner_result
    from mpify_fastai.training import DDPOptions, fit_distributed
    learn = bn_learner()
    with learn.no_bar(), learn.no_logging(): fit_distributed(learn, 'fit', (1, 0.5), {}, DDPOptions(split_batches=split_batches))
    return learner_result(learn)['state_dict'] if rank_world()[0] == 0 else None

# ---------------------------------------------------------------- each rank's own draws, though the factory seeds alike

class Jitter(Transform):
    "An augmentation of the training items: a shift drawn from Python's `random` for each image, recorded in `draws`."
    def __init__(self): self.draws = []
    def encodes(self, x: torch.Tensor):
        if not x.is_floating_point(): return x
        self.draws.append(random.random())
        return x + self.draws[-1] * 0.01

class RecordDraws(Callback):
    "Each rank writes its first training batch's dropout mask and its augmentation draws to `folder/rank<R>.json`."
    order = 60
    def __init__(self, folder: str): self.folder = folder
    def after_pred(self):
        if not self.training or self.iter or self.epoch: return
        drop = self.learn.model.module if hasattr(self.learn.model, 'module') else self.learn.model
        self.mask = drop.dropped.tolist()
    def after_fit(self):
        draws = [t for t in self.dls.train.after_item.fs if isinstance(t, Jitter)][0].draws
        Path(self.folder, f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({'mask': self.mask, 'draws': draws}))

class DropoutMLP(nn.Module):
    "An MLP with dropout that keeps its last mask (`dropped`: which hidden units it zeroed)."
    def __init__(self):
        super().__init__()
        self.body, self.drop, self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU()), nn.Dropout(0.5), nn.Linear(32, 10)
    def forward(self, x):
        h = self.body(x)
        out = self.drop(torch.ones_like(h))
        self.dropped = out == 0
        return self.head(h * out)

def seeded_learner(folder: str) -> Learner:
    "A factory (with `partial`) that seeds every rank alike (`set_seed(42)`), as notebooks often do; dropout and an augmentation."
    set_seed(42)
    train, valid = fh.digits_dsets(64, 32)
    dls = DataLoaders(TfmdDL(train, bs=16, shuffle=True, after_item=Jitter()), TfmdDL(valid, bs=16))
    return Learner(dls, DropoutMLP(), loss_func=CrossEntropyLossFlat(), cbs=RecordDraws(folder))

# ---------------------------------------------------------------- users' training metrics, replayed on the local batches

class BatchCount(Metric):
    "How many batches `accumulate` saw."
    def reset(self): self.n = 0
    def accumulate(self, learn): self.n += 1
    value = property(lambda self: float(self.n))

class MeanBatchAccuracy(Metric):
    "The mean of the per-batch accuracies (each batch counts once, whatever its size)."
    def reset(self): self.accs = []
    def accumulate(self, learn): self.accs.append(float((learn.pred.argmax(-1) == learn.y).float().mean()))
    value = property(lambda self: sum(self.accs) / len(self.accs))

class BatchLosses(Metric):
    "A per-batch list of losses, read with their positions: one entry per step, in order."
    def reset(self): self.losses = []
    def accumulate(self, learn): self.losses.append(float(learn.loss))
    value = property(lambda self: sum((i + 1) ** 1.5 * l for i, l in enumerate(self.losses)))

class SumLossGrad(Metric):
    "Reads `learn.loss_grad` (each rank's weighted by its share of the batch times the world under `split_batches`)."
    def reset(self): self.total = 0.
    def accumulate(self, learn): self.total += float(learn.loss_grad)
    value = property(lambda self: self.total)

class StopInBatch(Callback):
    "Cancels the fit after its third training batch, as `lr_find` does after `num_it` batches."
    def after_batch(self):
        if self.training and self.iter == 2: raise CancelFitException()

# 67 items at bs 13 (no multiple of 2 or 3): 5 batches of 13 and one of 2, so at 3 processes a rank has no item of it
USER_TRAIN = (67, 13)

def user_train_learner() -> Learner:
    "A deterministic digits MLP (plain SGD) with every shape of user metric, a few per-batch ones and fastai's, also in training."
    import user_metric_helpers as um
    from fastai.metrics import F1Score
    n_train, bs = USER_TRAIN
    train, valid = fh.digits_dsets(n_train, 50)
    dls = DataLoaders(TfmdDL(train, bs=bs), TfmdDL(valid, bs=12))
    table = [m for m in um.EXACT if m is not um.GrownArray]   # its np.append of a tensor that requires grad fails in training
    mets = [m() for m in table] + [BatchCount(), MeanBatchAccuracy(), BatchLosses(), SumLossGrad(), accuracy, F1Score(average='macro')]
    learn = Learner(dls, fh.mlp(3), loss_func=CrossEntropyLossFlat(), opt_func=partial(SGD, mom=0.), lr=0.2, wd=0., metrics=mets)
    learn.recorder.train_metrics = True
    return learn

def user_train_fit(split: bool) -> tuple[list, list[str], list[str]] | None:
    """Two epochs of `user_train_learner`, locally (`split` False) or in an `in_torchddp` rank as `split_batches=True`,
    then a fit cancelled inside a batch (as `lr_find` stops); rank 0's rows, inexact-metric warnings, metrics left wrapped."""
    import warnings
    from mpify_fastai.group import rank_world
    from mpify_fastai.metrics import InexactMetricWarning
    from mpify_fastai.training import DDPOptions, fit_distributed
    learn = user_train_learner()
    def run(epochs: int, cbs=()):
        if split: fit_distributed(learn, 'fit', (epochs,), {'cbs': cbs}, DDPOptions(split_batches=True))
        else: learn.fit(epochs, cbs=cbs)
    with warnings.catch_warnings(record=True) as caught, learn.no_bar(), learn.no_logging():
        warnings.simplefilter('always')
        run(2)
        rows = [[float(v) for v in row] for row in learn.recorder.values]
        run(1, [StopInBatch()])
    inexact = [str(w.message) for w in caught if issubclass(w.category, InexactMetricWarning)]
    wrapped = [m.name for m in learn.metrics if 'accumulate' in m.__dict__]
    return (rows, inexact, wrapped) if rank_world()[0] == 0 else None
