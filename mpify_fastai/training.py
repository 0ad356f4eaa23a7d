"""Training in a worker, shared by the notebook path (`fit_ddp`) and the torchrun path (`job`): which schedules run,
which callbacks run on rank 0 only, how a worker prepares the Learner, the epoch checkpoint, and how a Learner's
trained state moves between processes (`learner_result` in the worker, `apply_result` where it lands).
"""
from __future__ import annotations
import os
from typing import Callable
import torch
from fastai.callback.core import CancelValidException, Callback
from fastai.callback.schedule import LRFinder, ParamScheduler
from fastai.learner import Learner, SkipToEpoch
from fastcore.basics import noop
from fastcore.foundation import L
from torch.nn.parallel import DistributedDataParallel
from .group import local_device, rank_world
from .runner import DistributedRunner, opt_state_to
from .errors import LaunchError
from .files import atomic_write
from .progress import ProgressEvents

__all__ = ['SCHEDULES', 'RESUMABLE', 'RANK0_ONLY_CALLBACKS', 'DRAWN_BY_CALLER', 'SHOW_GRAPH', 'is_callback_of',
           'is_rank0_only', 'learner_result', 'apply_result', 'merged_history', 'recorder_history', 'EpochCheckpoint',
           'ResumedHistory', 'resume_kwargs', 'resume_callbacks', 'worker_learner',
           'fit_distributed', 'train_in_worker', 'WorkerLRFinder', 'find_lr_in_worker']

SCHEDULES = ('fit', 'fit_one_cycle', 'fine_tune', 'fit_flat_cos', 'fit_sgdr')
RESUMABLE = ('fit', 'fit_one_cycle', 'fit_flat_cos', 'fit_sgdr')   # schedules that take start_epoch
# callbacks that talk to the outside world (files, dashboards, the screen) run once, on rank 0; named, not imported,
# since most need optional packages. A callback of your own opts in with a class attribute `rank0_only = True`.
RANK0_ONLY_CALLBACKS = tuple(f'fastai.callback.{m}' for m in (
    'progress.CSVLogger', 'progress.ProgressCallback', 'progress.ShowGraphCallback', 'tensorboard.TensorBoardCallback',
    'tensorboard.TensorBoardProjectorCallback', 'wandb.WandbCallback', 'neptune.NeptuneCallback', 'comet.CometCallback',
    'azureml.AzureMLCallback', 'aim.AimCallback', 'dvclive.DvcLiveCallback'))
SHOW_GRAPH = 'fastai.callback.progress.ShowGraphCallback'
DRAWN_BY_CALLER = ('fastai.callback.progress.ProgressCallback', SHOW_GRAPH)   # under fit_ddp, the caller draws these

def is_callback_of(cb, names) -> bool:
    "`cb` (an instance, or a class as fastai also accepts in `cbs`) is, or derives from, a class named in `names`."
    cls = cb if isinstance(cb, type) else type(cb)
    return any(f'{c.__module__}.{c.__qualname__}' in names for c in cls.__mro__)

def is_rank0_only(cb) -> bool:
    "Whether `cb` runs on rank 0 only: fastai's loggers and displays, and any callback with `rank0_only = True`."
    return bool(getattr(cb, 'rank0_only', False)) or is_callback_of(cb, RANK0_ONLY_CALLBACKS)

# ---------------------------------------------------------------- a Learner's state between processes

def learner_result(learn: Learner) -> dict:
    "What rank 0 sends home: weights (CPU), recorder history, optimizer state and epoch counters."
    rec = learn.recorder
    opt = None
    model = learn.model.module if isinstance(learn.model, DistributedDataParallel) else learn.model
    if learn.opt is not None:
        opt = learn.opt.state_dict()
        opt['state'] = [{k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for s in opt['state']]
        opt['requires_grad'] = [p.requires_grad for p in model.parameters()]   # frozen as it ended (`fine_tune` unfreezes)
        opt['frozen_idx'] = getattr(learn.opt, 'frozen_idx', None)
    hist = {k: getattr(rec, k) for k in ('values', 'losses', 'lrs', 'iters', 'metric_names', 'hps') if hasattr(rec, k)}
    if 'losses' in hist: hist['losses'] = [float(l) for l in hist['losses']]
    return dict(state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()}, recorder=hist, opt=opt,
                epoch=getattr(learn, 'epoch', 0), n_epoch=getattr(learn, 'n_epoch', 0),
                final_record=getattr(learn, 'final_record', None))

def apply_result(learn: Learner, res: dict) -> None:
    """Load a `learner_result` into `learn`: weights into its model on its device, history into its recorder, optimizer
    state, and which parameters are frozen (a `fine_tune` ends unfrozen)."""
    sd = res['state_dict']
    own = learn.model.state_dict()
    bad = [k for k in own if k not in sd or own[k].shape != sd[k].shape] + [k for k in sd if k not in own]
    if bad: raise LaunchError(f"the trained weights do not fit this Learner's model (mismatched keys: {bad[:5]})")
    learn.model.load_state_dict(sd)
    if getattr(learn, 'dls', None) is not None: learn.model.to(learn.dls.device)   # where a local fit leaves it
    rec = learn.recorder
    for k, v in res['recorder'].items():
        if k == 'losses': v = [torch.tensor(x) for x in v]
        elif k == 'metric_names': v = L(v)
        setattr(rec, k, v)
    if res['opt'] is not None:
        if learn.opt is None: learn.create_opt()
        learn.opt.load_state_dict(res['opt'])
        opt_state_to(learn.opt)
        for p, rg in zip(learn.model.parameters(), res['opt'].get('requires_grad') or []): p.requires_grad_(rg)
        if res['opt'].get('frozen_idx') is not None: learn.opt.frozen_idx = res['opt']['frozen_idx']
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

def recorder_history(rec) -> dict:
    "A Recorder's per-epoch rows and per-batch losses, learning rates and iteration counts, as `learner_result` has them."
    return dict(values=list(rec.values), losses=[float(l) for l in rec.losses], lrs=list(rec.lrs), iters=list(rec.iters))

class EpochCheckpoint(Callback):
    """Rank 0 saves `learner_result` plus `completed_epoch` (and `tags`) to `path` at each epoch end, atomically, after
    the Recorder's row. In a fit that starts at `start_epoch` after the epochs of `history`, it skips the epochs before
    and saves the whole history, so a resume from it (or a second restart) has every row."""
    order = 70
    def __init__(self, path: str | os.PathLike, start_epoch: int = 0, history: dict | None = None, **tags):
        self.path,self.start,self.history,self.tags = path,start_epoch,history,tags
    def after_epoch(self):
        if rank_world()[0] != 0 or self.epoch < self.start: return
        res = learner_result(self.learn)
        if self.history: res['recorder'] = merged_history(res['recorder'], self.history, self.start)
        atomic_write(self.path, lambda f: torch.save({**res, 'completed_epoch': self.epoch, **self.tags}, f))

class ResumedHistory(Callback):
    "After a fit that skipped to `start_epoch`: the rows and losses of `history`'s epochs before it back in front."
    order = 51
    def __init__(self, history: dict, start_epoch: int): self.history,self.start = history,start_epoch
    def after_fit(self):
        rec = self.recorder
        hist = merged_history(recorder_history(rec), self.history, self.start)
        rec.values, rec.lrs, rec.iters = hist['values'], hist['lrs'], hist['iters']
        rec.losses = [torch.tensor(x) for x in hist['losses']]

def resume_kwargs(method: str, kwargs: dict, start_epoch: int) -> dict:
    "Keyword arguments that make `method` skip to `start_epoch`."
    kwargs = {**kwargs, 'start_epoch': start_epoch}
    if method == 'fit_flat_cos':   # fastai's fit_flat_cos accepts start_epoch but passes 0 on to fit
        kwargs['cbs'] = L(kwargs.get('cbs')) + [SkipToEpoch(start_epoch)]
    return kwargs

def resume_callbacks(learn: Learner, method: str, kwargs: dict, checkpoint: str | os.PathLike, resumed: dict | None = None,
                     history: dict | None = None, **tags) -> tuple[dict, list]:
    """The schedule's kwargs and the callbacks of a fit that checkpoints each epoch to `checkpoint` and goes on from
    where an earlier one stopped: from checkpoint `resumed` (applied to `learn` here), or from the user's own
    `start_epoch=` after the epochs of `history` (`recorder_history` of the caller's Learner: a pickled Recorder
    keeps no history), whose rows are kept in front."""
    if resumed is not None:
        apply_result(learn, resumed)
        kwargs, history = resume_kwargs(method, kwargs, resumed['completed_epoch'] + 1), resumed['recorder']
    start = kwargs.get('start_epoch', 0) if method in RESUMABLE else 0
    if start and method == 'fit_flat_cos' and resumed is None: kwargs = resume_kwargs(method, kwargs, start)
    if not (start and history and len(history['values']) >= start): history = None
    return kwargs, [EpochCheckpoint(checkpoint, start, history, **tags)] + ([ResumedHistory(history, start)] if history else [])

# ---------------------------------------------------------------- the worker's side of a DDP fit

def worker_learner(source: Learner | Callable[[], Learner], kwargs: dict, rank0_drops: tuple = (),
                   quiet: bool = False) -> tuple[Learner, dict]:
    """The Learner this worker trains (`source`, or what the factory `source()` builds) and the schedule's `kwargs`,
    without the callbacks this rank must not run: rank-0-only ones (`is_rank0_only`) on ranks > 0, those named in
    `rank0_drops` on rank 0. Ranks > 0 (and rank 0 if `quiet`) print no metrics; its DataLoaders use this rank's device."""
    learn = source if isinstance(source, Learner) else source()
    if not isinstance(learn, Learner): raise TypeError(f"the learner factory returned {type(learn).__name__}, not a Learner")
    rank = rank_world()[0]
    if rank or quiet: learn.logger = noop
    if getattr(learn, 'dls', None) is not None: learn.dls.device = local_device()   # not the caller's GPU 0 on every rank
    dropped = is_rank0_only if rank else (lambda cb: is_callback_of(cb, rank0_drops))
    for cb in list(learn.cbs):
        if dropped(cb): learn.remove_cb(cb)
    if kwargs.get('cbs') is not None: kwargs = {**kwargs, 'cbs': [cb for cb in L(kwargs['cbs']) if not dropped(cb)]}
    return learn, kwargs

def fit_distributed(learn: Learner, method: str, args: tuple, kwargs: dict, sync_bn: bool = True,
                    ddp_kwargs: dict | None = None, cbs: list = (), lead: list = ()) -> None:
    """Run schedule `method` on `learn` under `DistributedRunner` plus `cbs`; the callbacks in `lead` go first among
    those of their order, where fastai's ProgressCallback stood, so a logger on the Learner chains to theirs as locally."""
    with learn.added_cbs([DistributedRunner(sync_bn=sync_bn, **(ddp_kwargs or {}))] + list(cbs)):
        learn.cbs = L(list(lead) + [cb for cb in learn.cbs if not any(cb is x for x in lead)])
        try: getattr(learn, method)(*args, **kwargs)
        except RuntimeError as e:
            if 'find_unused_parameters' not in str(e) or (ddp_kwargs or {}).get('find_unused_parameters'): raise
            raise RuntimeError("the model has parameters that get no gradient in a step (a branch the forward skips, a "
                               "head the loss ignores), which DistributedDataParallel must be told about: pass "
                               "ddp_kwargs=dict(find_unused_parameters=True) to fit_ddp or learn.ddp(...)") from e

def train_in_worker(source: Learner | Callable[[], Learner], method: str, args: tuple, kwargs: dict, checkpoint: str,
                    sync_bn: bool, ddp_kwargs: dict, progress: bool = True, resumed: dict | None = None,
                    history: dict | None = None, restart: int = 0) -> dict | None:
    """Worker side of `fit_ddp`: train under DDP (from checkpoint `resumed` after a restart, or after the caller's
    `history` with `start_epoch=`), checkpoint each epoch, send rank 0's progress to the caller; rank 0 returns the
    trained state. `MPIFY_RESTART_COUNT` tells callbacks which attempt this is, as torchrun's TORCHELASTIC_RESTART_COUNT."""
    os.environ['MPIFY_RESTART_COUNT'] = str(restart)
    rank = rank_world()[0]
    learn, kwargs = worker_learner(source, kwargs, rank0_drops=DRAWN_BY_CALLER, quiet=not progress)
    kwargs, cbs = resume_callbacks(learn, method, kwargs, checkpoint, resumed, history)
    lead = [ProgressEvents()] if rank == 0 and progress else []
    fit_distributed(learn, method, args, kwargs, sync_bn, ddp_kwargs, cbs=cbs + lead, lead=lead)
    return learner_result(learn) if rank == 0 else None

class WorkerLRFinder(LRFinder):
    """fastai's LRFinder without saving and reloading the model around the run: a worker's copy is thrown away and the
    caller's Learner is never touched (fastai's reload waits at a barrier that only rank 0 reaches)."""
    def before_fit(self):
        ParamScheduler.before_fit(self)
        self.best_loss = float('inf')
    def after_fit(self): self.learn.opt.zero_grad()
    def before_validate(self):
        "A rank's share of an epoch is shorter than a local one: its epoch ends would validate where a local lr_find does not."
        raise CancelValidException()

def find_lr_in_worker(source: Learner | Callable[[], Learner], start_lr, end_lr, num_it: int, stop_div: bool, sync_bn: bool,
                      ddp_kwargs: dict) -> dict | None:
    """Worker side of `learn.ddp(n).lr_find(...)`: the mock training of fastai's `lr_find` under DDP, each step's loss
    that of the whole global batch (averaged across ranks); rank 0 returns the learning rates and losses."""
    rank, world = rank_world()
    learn, _ = worker_learner(source, {}, rank0_drops=DRAWN_BY_CALLER, quiet=True)
    n_epoch = num_it // max(1, len(learn.dls.train) // world) + 1   # each rank steps through its share of an epoch
    with learn.no_logging():
        fit_distributed(learn, 'fit', (n_epoch,), {}, sync_bn, ddp_kwargs,
                        cbs=[WorkerLRFinder(start_lr=start_lr, end_lr=end_lr, num_it=num_it, stop_div=stop_div)])
    rec = learn.recorder
    return dict(lrs=list(rec.lrs), losses=[float(l) for l in rec.losses]) if rank == 0 else None
