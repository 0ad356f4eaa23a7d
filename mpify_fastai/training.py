"""Training in a worker, shared by the notebook path (`fit_ddp`) and the torchrun path (`job`): which schedules run,
which callbacks run on rank 0 only, how a worker prepares the Learner, the epoch checkpoint, and how a Learner's
trained state moves between processes (`learner_result` in the worker, `apply_result` where it lands).
"""
from __future__ import annotations
import os
from typing import Callable
import torch
from fastai.callback.core import Callback
from fastai.callback.progress import CSVLogger, ProgressCallback, ShowGraphCallback
from fastai.learner import Learner
from fastcore.basics import noop
from fastcore.foundation import L
from torch.nn.parallel import DistributedDataParallel
from .ddp import rank_world
from .distributed import DistributedRunner, opt_state_to
from .errors import LaunchError
from .files import atomic_write
from .progress import ProgressEvents

__all__ = ['SCHEDULES', 'RESUMABLE', 'RANK0_ONLY_CALLBACKS', 'DRAWN_BY_CALLER', 'is_callback_of', 'learner_result',
           'apply_result', 'merged_history', 'EpochCheckpoint', 'worker_learner', 'fit_distributed', 'train_in_worker']

SCHEDULES = ('fit', 'fit_one_cycle', 'fine_tune', 'fit_flat_cos', 'fit_sgdr')
RESUMABLE = ('fit', 'fit_one_cycle', 'fit_flat_cos', 'fit_sgdr')   # schedules that take start_epoch
RANK0_ONLY_CALLBACKS = (CSVLogger, ProgressCallback, ShowGraphCallback)   # side effects that must happen once
DRAWN_BY_CALLER = (ProgressCallback, ShowGraphCallback)   # under fit_ddp the caller draws these from rank 0's events

def is_callback_of(cb, types) -> bool:
    "`cb` is an instance of `types`, or a callback class among them (fastai accepts both in `cbs`)."
    return isinstance(cb, types) or (isinstance(cb, type) and issubclass(cb, types))

# ---------------------------------------------------------------- a Learner's state between processes

def learner_result(learn: Learner) -> dict:
    "What rank 0 sends home: weights (CPU), recorder history, optimizer state and epoch counters."
    rec = learn.recorder
    opt = None
    if learn.opt is not None:
        opt = learn.opt.state_dict()
        opt['state'] = [{k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for s in opt['state']]
    hist = {k: getattr(rec, k) for k in ('values', 'losses', 'lrs', 'iters', 'metric_names', 'hps') if hasattr(rec, k)}
    if 'losses' in hist: hist['losses'] = [float(l) for l in hist['losses']]
    model = learn.model.module if isinstance(learn.model, DistributedDataParallel) else learn.model
    return dict(state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()}, recorder=hist, opt=opt,
                epoch=getattr(learn, 'epoch', 0), n_epoch=getattr(learn, 'n_epoch', 0),
                final_record=getattr(learn, 'final_record', None))

def apply_result(learn: Learner, res: dict) -> None:
    "Load a `learner_result` into `learn`: weights into its model on its device, history into its recorder, optimizer state."
    sd = res['state_dict']
    own = learn.model.state_dict()
    bad = [k for k in own if k not in sd or own[k].shape != sd[k].shape] + [k for k in sd if k not in own]
    if bad: raise LaunchError(f"the trained weights do not fit this Learner's model (mismatched keys: {bad[:5]})")
    learn.model.load_state_dict(sd)
    rec = learn.recorder
    for k, v in res['recorder'].items():
        if k == 'losses': v = [torch.tensor(x) for x in v]
        elif k == 'metric_names': v = L(v)
        setattr(rec, k, v)
    if res['opt'] is not None:
        if learn.opt is None: learn.create_opt()
        learn.opt.load_state_dict(res['opt'])
        opt_state_to(learn.opt)
    learn.epoch, learn.n_epoch, learn.final_record = res['epoch'], res['n_epoch'], res['final_record']

def merged_history(hist: dict, old: dict, done: int) -> dict:
    """The history of a resumed fit (`hist`, as `learner_result` gives it) with the `done` epochs of a checkpoint's
    history (`old`) in front: the resumed fit's rows for the skipped epochs are empty, its iteration counts restart."""
    hist = dict(hist)
    hist['values'] = list(old['values'][:done]) + list(hist['values'][done:])
    hist['losses'] = list(old['losses']) + list(hist['losses'])
    hist['lrs'] = list(old['lrs']) + list(hist['lrs'])
    off = old['iters'][done - 1] if done else 0
    hist['iters'] = list(old['iters'][:done]) + [i + off for i in hist['iters'][done:]]
    return hist

class EpochCheckpoint(Callback):
    """Rank 0 saves `learner_result` plus `completed_epoch` (and `tags`) to `path` at each epoch end, atomically, after
    the Recorder's row. In a fit resumed from checkpoint `resumed` it skips the epochs done before and saves the whole
    history, so a second restart resumes from a complete one."""
    order = 70
    def __init__(self, path: str | os.PathLike, resumed: dict | None = None, **tags):
        self.path,self.resumed,self.tags = path,resumed,tags
        self.done = resumed['completed_epoch'] + 1 if resumed else 0
    def after_epoch(self):
        if rank_world()[0] != 0 or self.epoch < self.done: return
        res = learner_result(self.learn)
        if self.resumed: res['recorder'] = merged_history(res['recorder'], self.resumed['recorder'], self.done)
        atomic_write(self.path, lambda f: torch.save({**res, 'completed_epoch': self.epoch, **self.tags}, f))

# ---------------------------------------------------------------- the worker's side of a DDP fit

def worker_learner(source: Learner | Callable[[], Learner], kwargs: dict, rank0_drops: tuple = (),
                   quiet: bool = False) -> tuple[Learner, dict]:
    """The Learner this worker trains (`source`, or what the factory `source()` builds) and the schedule's `kwargs`,
    without the callbacks this rank must not run: `RANK0_ONLY_CALLBACKS` on ranks > 0, `rank0_drops` on rank 0.
    Ranks > 0 (and rank 0 if `quiet`) print no metrics."""
    learn = source if isinstance(source, Learner) else source()
    if not isinstance(learn, Learner): raise TypeError(f"the learner factory returned {type(learn).__name__}, not a Learner")
    rank = rank_world()[0]
    if rank or quiet: learn.logger = noop
    drop = RANK0_ONLY_CALLBACKS if rank else rank0_drops
    for cb in list(learn.cbs):
        if is_callback_of(cb, drop): learn.remove_cb(cb)
    if kwargs.get('cbs') is not None: kwargs = {**kwargs, 'cbs': [cb for cb in L(kwargs['cbs']) if not is_callback_of(cb, drop)]}
    return learn, kwargs

def fit_distributed(learn: Learner, method: str, args: tuple, kwargs: dict, sync_bn: bool = True,
                    ddp_kwargs: dict | None = None, cbs: list = (), lead: list = ()) -> None:
    """Run schedule `method` on `learn` under `DistributedRunner` plus `cbs`; the callbacks in `lead` go first among
    those of their order, where fastai's ProgressCallback stood, so a logger on the Learner chains to theirs as locally."""
    import fastai.callback.schedule   # noqa: F401  (adds fit_one_cycle, fine_tune, fit_flat_cos, fit_sgdr)
    with learn.added_cbs([DistributedRunner(sync_bn=sync_bn, **(ddp_kwargs or {}))] + list(cbs)):
        learn.cbs = L(list(lead) + [cb for cb in learn.cbs if not any(cb is x for x in lead)])
        getattr(learn, method)(*args, **kwargs)

def train_in_worker(source: Learner | Callable[[], Learner], method: str, args: tuple, kwargs: dict, checkpoint: str,
                    sync_bn: bool, ddp_kwargs: dict, progress: bool = True) -> dict | None:
    """Worker side of `fit_ddp`: train under DDP, checkpoint each epoch, send rank 0's progress to the caller;
    rank 0 returns the trained state."""
    rank = rank_world()[0]
    learn, kwargs = worker_learner(source, kwargs, rank0_drops=DRAWN_BY_CALLER, quiet=not progress)
    lead = [ProgressEvents()] if rank == 0 and progress else []
    fit_distributed(learn, method, args, kwargs, sync_bn, ddp_kwargs, cbs=[EpochCheckpoint(checkpoint)] + lead, lead=lead)
    return learner_result(learn) if rank == 0 else None
