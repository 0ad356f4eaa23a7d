"""Training in a worker, shared by the notebook path (`fit_ddp`), the torchrun path (`job`) and SLURM (`slurm`): the
`DDPJob` record, which schedules run, which callbacks run on rank 0 only, how a worker prepares the Learner, and its DDP
fit and `lr_find`. Epoch checkpoints and resuming live in `recovery`; a trained state's move between processes in `state`.
"""
from __future__ import annotations
import inspect, os
from dataclasses import dataclass, field
from typing import Callable
from fastai.callback.core import CancelValidException
from fastai.callback.schedule import LRFinder, ParamScheduler
from fastai.learner import Learner
from fastcore.basics import noop
from fastcore.foundation import L
from .errors import ArgumentTypeError
from .group import local_device, rank_world
from .launch import OptionRecord
from .progress import ProgressEvents
from .recovery import resume_callbacks
from .runner import DistributedRunner
from .state import learner_result

__all__ = ['SCHEDULES', 'RANK0_ONLY_CALLBACKS', 'DRAWN_BY_CALLER', 'SHOW_GRAPH', 'DDPOptions', 'DDPJob', 'call_arguments', 'is_callback_of',
           'is_rank0_only', 'worker_learner', 'fit_distributed', 'train_in_worker', 'WorkerLRFinder', 'find_lr_in_worker']

SCHEDULES = ('fit', 'fit_one_cycle', 'fine_tune', 'fit_flat_cos', 'fit_sgdr')
# callbacks that talk to the outside world (files, dashboards, the screen) run once, on rank 0; named, not imported,
# since most need optional packages. A callback of your own opts in with a class attribute `rank0_only = True`.
RANK0_ONLY_CALLBACKS = tuple(f'fastai.callback.{m}' for m in (
    'progress.CSVLogger', 'progress.ProgressCallback', 'progress.ShowGraphCallback', 'tensorboard.TensorBoardCallback',
    'tensorboard.TensorBoardProjectorCallback', 'wandb.WandbCallback', 'neptune.NeptuneCallback', 'comet.CometCallback',
    'azureml.AzureMLCallback', 'aim.AimCallback', 'dvclive.DvcLiveCallback'))
SHOW_GRAPH = 'fastai.callback.progress.ShowGraphCallback'
DRAWN_BY_CALLER = ('fastai.callback.progress.ProgressCallback', SHOW_GRAPH)   # under fit_ddp, the caller draws these

@dataclass(frozen=True)
class DDPOptions(OptionRecord):
    """How each rank trains: SyncBatchNorm on GPUs (`sync_bn`), DistributedDataParallel's own `ddp_kwargs`, and
    `split_batches` (each step sees the local batch, split across the ranks, instead of one whole batch per rank)."""
    sync_bn: bool = True
    ddp_kwargs: dict | None = None
    split_batches: bool = False
    def __post_init__(self):
        if not isinstance(self.split_batches, bool):
            raise ArgumentTypeError(f"split_batches must be True or False, got {self.split_batches!r}")
        if not isinstance(self.ddp_kwargs, (dict, type(None))):
            raise ArgumentTypeError(f"ddp_kwargs must be a dict of DistributedDataParallel arguments, got {type(self.ddp_kwargs).__name__}")
        object.__setattr__(self, 'ddp_kwargs', dict(self.ddp_kwargs or {}))

@dataclass
class DDPJob:
    """One piece of DDP work on a Learner, built once in the caller and run alike by `fit_ddp`, `learn.ddp(...)` (schedules,
    inference, `lr_find`) and torchrun jobs: `method` of `source` (a Learner, or a factory building one) with its
    arguments. A fit also carries where each epoch is checkpointed and the state it resumes from."""
    source: Learner | Callable[[], Learner]
    method: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    ddp: DDPOptions = field(default_factory=DDPOptions)
    progress: bool = True             # rank 0 sends the live table to the caller
    checkpoint: str | None = None     # where rank 0 saves each completed epoch
    resumed: dict | None = None       # the checkpoint a restarted attempt goes on from
    history: dict | None = None       # the caller's recorder history, kept in front of a `start_epoch=` fit's rows
    restart: int = 0                  # which attempt this is (`MPIFY_RESTART_COUNT` in the workers)

_PASSES_ON = {'fine_tune': 'fit_one_cycle'}   # fastai's fine_tune passes its **kwargs on to fit_one_cycle

def call_arguments(method: str, args: tuple, kwargs: dict) -> dict:
    """The arguments of `Learner.<method>(*args, **kwargs)` by name, defaults filled in; an `ArgumentTypeError` naming the
    call where they do not fit its signature, so that a wrong one fails before any worker starts."""
    def bind(name, args, kwargs):
        try: bound = inspect.signature(getattr(Learner, name)).bind(None, *args, **kwargs)
        except TypeError as e:
            shown = ', '.join([*map(repr, args), *(f'{k}={v!r}' for k, v in kwargs.items())])
            raise ArgumentTypeError(f"learn.ddp(...).{method}({shown}): {e}") from None
        bound.apply_defaults()
        return {k: v for k, v in bound.arguments.items() if k != 'self'}
    out = bind(method, args, kwargs)
    rest = out.pop('kwargs', {})
    if rest and method in _PASSES_ON: bind(_PASSES_ON[method], (), {**{'n_epoch': 1}, **rest})
    return {**out, **rest}

def is_callback_of(cb, names) -> bool:
    "`cb` (an instance, or a class as fastai also accepts in `cbs`) is, or derives from, a class named in `names`."
    cls = cb if isinstance(cb, type) else type(cb)
    return any(f'{c.__module__}.{c.__qualname__}' in names for c in cls.__mro__)

def is_rank0_only(cb) -> bool:
    "Whether `cb` runs on rank 0 only: fastai's loggers and displays, and any callback with `rank0_only = True`."
    return bool(getattr(cb, 'rank0_only', False)) or is_callback_of(cb, RANK0_ONLY_CALLBACKS)

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

def fit_distributed(learn: Learner, method: str, args: tuple, kwargs: dict, ddp: DDPOptions = DDPOptions(),
                    cbs: list = (), lead: list = ()) -> None:
    """Run schedule `method` on `learn` under `DistributedRunner` plus `cbs`; the callbacks in `lead` go first among
    those of their order, where fastai's ProgressCallback stood, so a logger on the Learner chains to theirs as locally."""
    with learn.added_cbs([DistributedRunner(ddp.sync_bn, ddp.split_batches, **ddp.ddp_kwargs)] + list(cbs)):
        learn.cbs = L(list(lead) + [cb for cb in learn.cbs if not any(cb is x for x in lead)])
        try: getattr(learn, method)(*args, **kwargs)
        except RuntimeError as e:
            if 'find_unused_parameters' not in str(e) or ddp.ddp_kwargs.get('find_unused_parameters'): raise
            raise RuntimeError("the model has parameters that get no gradient in a step (a branch the forward skips, a "
                               "head the loss ignores), which DistributedDataParallel must be told about: pass "
                               "ddp_kwargs=dict(find_unused_parameters=True) to fit_ddp or learn.ddp(...)") from e

def train_in_worker(job: DDPJob) -> dict | None:
    """Worker side of `fit_ddp`: train under DDP (from checkpoint `job.resumed` after a restart, or after the caller's
    `job.history` with `start_epoch=`), checkpoint each epoch, send rank 0's progress to the caller; rank 0 returns the
    trained state. `MPIFY_RESTART_COUNT` tells callbacks which attempt this is, as torchrun's TORCHELASTIC_RESTART_COUNT."""
    os.environ['MPIFY_RESTART_COUNT'] = str(job.restart)
    rank = rank_world()[0]
    learn, kwargs = worker_learner(job.source, job.kwargs, rank0_drops=DRAWN_BY_CALLER, quiet=not job.progress)
    kwargs, cbs = resume_callbacks(learn, job.method, kwargs, job.checkpoint, job.resumed, job.history)
    lead = [ProgressEvents()] if rank == 0 and job.progress else []
    fit_distributed(learn, job.method, job.args, kwargs, job.ddp, cbs=cbs + lead, lead=lead)
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

def find_lr_in_worker(job: DDPJob) -> dict | None:
    """Worker side of `learn.ddp(n).lr_find(...)`: the mock training of fastai's `lr_find` under DDP, each step's loss
    that of the whole global batch (averaged across ranks; with `split_batches`, the local batch's, as a local `lr_find`);
    rank 0 returns the learning rates and losses.
    `job.kwargs` are `Learner.lr_find`'s arguments by name."""
    rank, world = rank_world()
    learn, _ = worker_learner(job.source, {}, rank0_drops=DRAWN_BY_CALLER, quiet=True)
    p = job.kwargs
    steps = len(learn.dls.train) // (1 if job.ddp.split_batches else world)   # a rank's steps in an epoch
    n_epoch = p['num_it'] // max(1, steps) + 1
    finder = WorkerLRFinder(start_lr=p['start_lr'], end_lr=p['end_lr'], num_it=p['num_it'], stop_div=p['stop_div'])
    with learn.no_logging(): fit_distributed(learn, 'fit', (n_epoch,), {}, job.ddp, cbs=[finder])
    rec = learn.recorder
    return dict(lrs=list(rec.lrs), losses=[float(l) for l in rec.losses]) if rank == 0 else None
