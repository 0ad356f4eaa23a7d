"""Notebook-side API: `Learner.fit_ddp` and `Learner.ddp(...)` train in DDP workers and bring the result home.

The notebook's Learner (or a zero-argument factory building one) is shipped once; rank 0 returns weights,
recorder history and optimizer state, applied to the notebook's Learner in one step after every worker has
succeeded. On failure the notebook's Learner is untouched and the error carries the last epoch's checkpoint.
"""
from __future__ import annotations
import inspect, os, shutil, tempfile
from collections import namedtuple
from dataclasses import asdict, dataclass, fields
from typing import Callable, Sequence
from fastai.learner import Learner
import torch
from fastcore.basics import patch, patch_to, tuplify
from fastcore.foundation import L
from .group import launch_in_group, peer_failure, visible_gpu_count
from .errors import LaunchError, WorkerDied, WorkerError
from .files import owned_tempdir
from .launch import check_nprocs
from .progress import ProgressDisplay
from .inference import INFERENCE, infer_in_worker, merge_shards
from .training import (RESUMABLE, SCHEDULES, SHOW_GRAPH, apply_result, find_lr_in_worker, is_callback_of,
                       recorder_history, train_in_worker)

__all__ = ['fit_ddp', 'DDPMethods', 'METHODS', 'LaunchOptions', 'LAUNCH_OPTIONS']

@dataclass
class LaunchOptions:
    """How `fit_ddp` and `learn.ddp(...)` launch: `in_torchddp`'s options (results come from rank 0), the live `progress`
    table, and `max_restarts` (as torchrun's: a run whose worker died goes on from its last completed epoch)."""
    backend: str | None = None
    devices: Sequence[int] | None = None
    need: str = ''
    imports: str = ''
    start_method: str = 'warm'
    timeout: float | None = None
    output: str = 'rank0'
    progress: bool = True
    max_restarts: int = 0

LAUNCH_OPTIONS = tuple(f.name for f in fields(LaunchOptions))
METHODS = SCHEDULES + INFERENCE + ('lr_find',)   # what `learn.ddp(...)` can run
_LR_NAME = {'fit': 'lr', 'fit_one_cycle': 'lr_max', 'fit_sgdr': 'lr_max', 'fine_tune': 'base_lr', 'fit_flat_cos': 'lr'}

def _default_nprocs(nprocs: int | None) -> int:
    if nprocs is not None: return nprocs
    n = visible_gpu_count()
    if n == 0: raise ValueError("nprocs is required on a machine without GPUs: e.g. fit_ddp(..., nprocs=2) for 2 CPU processes")
    return n

def _launch_options(nprocs: int | None, launch_opts: dict) -> tuple[int, dict, bool, int]:
    """`nprocs` and the launch options checked before anything starts: (nprocs, the group's options for
    `launch_in_group`, `progress`, `max_restarts`)."""
    unknown = set(launch_opts) - set(LAUNCH_OPTIONS)
    if unknown: raise TypeError(f"unexpected launch option(s): {', '.join(sorted(unknown))}; known: {', '.join(LAUNCH_OPTIONS)}")
    opts = asdict(LaunchOptions(**launch_opts))
    progress, n = opts.pop('progress'), opts.pop('max_restarts')
    if isinstance(n, bool) or not isinstance(n, int) or n < 0: raise ValueError(f"max_restarts must be an int >= 0, got {n!r}")
    return check_nprocs(_default_nprocs(nprocs)), opts, progress, n

def _checkpoint(path: str) -> dict | None:
    "The last completed epoch's state a run left at `path`, if any."
    return torch.load(path, weights_only=False) if os.path.exists(path) else None

def _restartable(e: LaunchError) -> bool:
    "A worker died, or a collective failed because a peer went away: worth a restart. A Python error in user code is not."
    return isinstance(e, WorkerDied) or (isinstance(e, WorkerError) and peer_failure(e))

def _stopped(learn: Learner, ck: dict | None, method: str, args: tuple) -> None:
    "After an interrupt: the Learner gets the last completed epoch's state, and one line says so and how to go on."
    if ck is None: return print("mpify_fastai: stopped before the first epoch ended; the Learner is as it was", flush=True)
    apply_result(learn, ck)
    done, n = ck['completed_epoch'] + 1, ck['n_epoch']
    how = (f"to go on: learn.ddp(...).{method}({', '.join(map(repr, args))}, ..., start_epoch={done})" if method in RESUMABLE
           else f"{method} cannot skip epochs: run it again, or go on with learn.ddp(...).fit_one_cycle(...)")
    print(f"mpify_fastai: stopped after epoch {done} of {n}; the Learner holds epoch {done}; {how}", flush=True)

def _launch_training(learn: Learner, source: Learner | Callable[[], Learner], method: str, args: tuple, kwargs: dict,
                     nprocs: int | None, sync_bn: bool = True, ddp_kwargs: dict | None = None, **launch_opts) -> dict:
    """Run schedule `method` on `nprocs` DDP workers, drawing rank 0's progress here, restarting from the last completed
    epoch up to `max_restarts` times; return rank 0's result (nothing applied yet). On an interrupt the Learner gets
    the last completed epoch; on a failure it is untouched and the error keeps that epoch's checkpoint."""
    if method not in SCHEDULES: raise ValueError(f"method must be one of {SCHEDULES}, got {method!r}")
    nprocs, launch_opts, progress, max_restarts = _launch_options(nprocs, launch_opts)
    ckdir = owned_tempdir('ckpt')
    checkpoint = os.path.join(ckdir, 'last_epoch.pth')
    cbs = L(learn.cbs) + L(kwargs.get('cbs'))
    display = ProgressDisplay(graph=any(is_callback_of(cb, (SHOW_GRAPH,)) for cb in cbs))
    resumed, restart = None, 0
    history = recorder_history(learn.recorder) if 'values' in vars(learn.recorder) else None   # start_epoch= keeps its rows
    try:
        while True:
            try:
                return launch_in_group(nprocs, train_in_worker, (source, method, args, kwargs, checkpoint, sync_bn,
                                       ddp_kwargs or {}, progress, resumed, history, restart), gather=0, on_event=display,
                                       arg_names={'learn' if source is learn else 'factory': source}, **launch_opts)
            except LaunchError as e:
                if restart >= max_restarts or not _restartable(e): raise
                restart += 1
                resumed = _checkpoint(checkpoint) if method in RESUMABLE else None
                epoch = resumed['completed_epoch'] + 1 if resumed else 0
                display.restarting(f"mpify_fastai: {e.args[0].splitlines()[0]}; restarting from epoch {epoch} "
                                   f"(restart {restart} of {max_restarts})", epoch)
    except KeyboardInterrupt:
        _stopped(learn, _checkpoint(checkpoint), method, args)
        raise
    except LaunchError as e:
        if os.path.exists(checkpoint):
            kept = os.path.join(tempfile.gettempdir(), f'mpify-recovered-{os.getpid()}-{os.path.basename(ckdir)}.pth')
            shutil.move(checkpoint, kept)
            e.checkpoint = kept
            e.args = (f"{e.args[0]}\n\nThe last completed epoch (weights, optimizer, history) is saved in {kept}: "
                      f"learn.load_ddp_result({kept!r}) applies it to the Learner",)
        raise
    finally:
        display.close()
        shutil.rmtree(ckdir, ignore_errors=True)

def _call_arguments(method: str, learn: Learner, args: tuple, kwargs: dict) -> dict:
    "The arguments of `Learner.<method>(*args, **kwargs)` by name, checked here (a wrong one fails before any launch)."
    bound = inspect.signature(getattr(Learner, method)).bind(learn, *args, **kwargs)
    bound.apply_defaults()
    out = {k: v for k, v in bound.arguments.items() if k != 'self'}
    return {**{k: v for k, v in out.items() if k != 'kwargs'}, **out.get('kwargs', {})}

def _suggested_lrs(rec, num_it: int, suggest_funcs, show_plot: bool):
    "fastai's `lr_find` suggestions (a named tuple) from the recorder's learning rates and losses; the plot here."
    lrs, losses = torch.tensor(rec.lrs[num_it // 10:-5]), torch.tensor([float(l) for l in rec.losses[num_it // 10:-5]])
    nan = torch.nonzero(torch.isnan(losses))
    if len(nan): lrs, losses = lrs[:int(nan.min())], losses[:int(nan.min())]
    funcs = tuplify(suggest_funcs)
    names = [getattr(f, 'func', f).__name__ for f in funcs]
    found = [f(lrs, losses, num_it) for f in funcs]
    if show_plot: rec.plot_lr_find(suggestions=[p for _, p in found], nms=names)
    return namedtuple('SuggestedLRs', names)(*[lr for lr, _ in found])

class DDPMethods:
    """What `learn.ddp(nprocs=2, **launch_options)` returns: call a schedule on it (`.fit`, `.fit_one_cycle`, `.fine_tune`,
    `.fit_flat_cos`, `.fit_sgdr`: the result is applied to the Learner), inference (`.get_preds`, `.tta`, `.validate`:
    each rank predicts its shard, the result comes back as a local call returns it) or `.lr_find` (the Learner's
    weights stay as they were; its recorder gets the lrs and losses)."""
    def __init__(self, learn: Learner, nprocs: int | None = None, factory: Callable | None = None, sync_bn: bool = True,
                 ddp_kwargs: dict | None = None, **launch_opts):
        if factory is not None and not callable(factory): raise TypeError("factory must be a zero-argument function that returns a Learner")
        self.learn,self.nprocs,self.factory,self.sync_bn,self.ddp_kwargs,self.launch_opts = learn,nprocs,factory,sync_bn,ddp_kwargs,launch_opts

    def __getattr__(self, method: str):
        if method not in METHODS: raise AttributeError(f"learn.ddp(...) can run {', '.join(METHODS)}; not {method!r}")
        def call(*args, **kwargs):
            if method in SCHEDULES:
                res = _launch_training(self.learn, self.source, method, args, kwargs, self.nprocs, self.sync_bn,
                                       self.ddp_kwargs, **self.launch_opts)
                return apply_result(self.learn, res)
            params = _call_arguments(method, self.learn, args, kwargs)
            nprocs, opts, _, _ = _launch_options(self.nprocs, self.launch_opts)   # no table or restarts outside a fit
            if method == 'lr_find': return self._lr_find(nprocs, params, opts)
            res = launch_in_group(nprocs, infer_in_worker, (self.source, method, params),
                                  gather=0 if method == 'validate' else 'all', **opts)
            return res if method == 'validate' else merge_shards(res)
        call.__name__ = f'{method}_ddp'
        return call

    @property
    def source(self) -> Learner | Callable[[], Learner]: return self.factory or self.learn

    def _lr_find(self, nprocs: int, params: dict, opts: dict):
        res = launch_in_group(nprocs, find_lr_in_worker, (self.source, params['start_lr'], params['end_lr'], params['num_it'],
                              params['stop_div'], self.sync_bn, self.ddp_kwargs or {}), gather=0, **opts)
        rec = self.learn.recorder
        rec.lrs, rec.losses = res['lrs'], [torch.tensor(l) for l in res['losses']]
        rec.iters, rec.values = [], []   # as a local lr_find within one epoch leaves them: no earlier fit's rows in plot_loss()
        if params['suggest_funcs'] is None: return None
        return _suggested_lrs(rec, params['num_it'], params['suggest_funcs'], params['show_plot'])

@patch
def ddp(self: Learner, nprocs: int | None = None, factory: Callable | None = None, sync_bn: bool = True,
        ddp_kwargs: dict | None = None, **launch_opts) -> DDPMethods:
    "Run the next call under DDP on `nprocs` workers, e.g. `learn.ddp(nprocs=2).fine_tune(3)` or `.get_preds()`."
    return DDPMethods(self, nprocs, factory, sync_bn, ddp_kwargs, **launch_opts)

def learner_fit_ddp(self: Learner, n_epoch: int, lr=None, wd=None, cbs=None, reset_opt: bool = False, start_epoch: int = 0, *,
                    nprocs: int | None = None, factory: Callable | None = None, sync_bn: bool = True,
                    ddp_kwargs: dict | None = None, **launch_opts) -> None:
    "`Learner.fit` on `nprocs` DDP workers; the notebook's Learner gets rank 0's weights, history and optimizer state."
    self.ddp(nprocs, factory, sync_bn, ddp_kwargs, **launch_opts).fit(n_epoch, lr=lr, wd=wd, cbs=cbs, reset_opt=reset_opt,
                                                                       start_epoch=start_epoch)
patch_to(Learner, nm='fit_ddp')(learner_fit_ddp)   # the method `learn.fit_ddp`; the module's `fit_ddp` is the function form

def fit_ddp(factory: Callable[[], Learner], n_epoch: int, lr=None, *, nprocs: int | None = None, method: str = 'fit',
            **kwargs) -> Learner:
    """Function form: build the Learner with `factory()` in each worker, train with `method` (`fit` by default),
    and return a Learner built here by the same factory, holding the trained result."""
    if not callable(factory): raise TypeError("factory must be a zero-argument function that returns a Learner")
    if method not in SCHEDULES: raise ValueError(f"method must be one of {SCHEDULES}, got {method!r}")
    launch_opts = {k: kwargs.pop(k) for k in list(kwargs) if k in LAUNCH_OPTIONS}
    sync_bn, ddp_kwargs = kwargs.pop('sync_bn', True), kwargs.pop('ddp_kwargs', None)
    learn = factory()
    if lr is not None: kwargs[_LR_NAME[method]] = lr
    res = _launch_training(learn, factory, method, (n_epoch,), kwargs, nprocs, sync_bn, ddp_kwargs, **launch_opts)
    apply_result(learn, res)
    return learn
