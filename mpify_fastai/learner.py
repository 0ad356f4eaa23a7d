"""Notebook-side API: `Learner.fit_ddp` and `Learner.ddp(...)` train in DDP workers and bring the result home.

The notebook's Learner (or a zero-argument factory building one) is shipped once, inside a `DDPJob`; rank 0 returns
weights, recorder history and optimizer state, applied to the notebook's Learner in one step after every worker has
succeeded. On failure the notebook's Learner is untouched and the error carries the last epoch's checkpoint (`recovery`).
"""
from __future__ import annotations
import inspect, os, shutil
from collections import namedtuple
from dataclasses import dataclass, fields, replace
from typing import Callable
import torch
from fastai.learner import Learner
from fastcore.basics import tuplify
from fastcore.foundation import L
from .errors import ArgumentError, ArgumentTypeError, LaunchError, surfaces_errors
from .files import owned_tempdir
from .group import GroupOptions, visible_gpu_count
from .inference import INFERENCE, infer_in_worker, merge_shards
from .launch import LaunchOptions, OptionRecord, check_nprocs, launch, with_options
from .progress import ProgressDisplay
from .recovery import keep_checkpoint, last_checkpoint, stopped_at_checkpoint, with_restarts
from .state import apply_result, recorder_history
from .versions import add_method
from .training import (SCHEDULES, SHOW_GRAPH, DDPJob, DDPOptions, call_arguments, find_lr_in_worker, is_callback_of,
                       train_in_worker)

__all__ = ['fit_ddp', 'DDPMethods', 'METHODS', 'FitOptions']

METHODS = SCHEDULES + INFERENCE + ('lr_find',)   # what `learn.ddp(...)` can run
_LR_NAME = {'fit': 'lr', 'fit_one_cycle': 'lr_max', 'fit_sgdr': 'lr_max', 'fine_tune': 'base_lr', 'fit_flat_cos': 'lr'}

@dataclass(frozen=True)
class FitOptions(OptionRecord):
    """What a fit under `fit_ddp`/`learn.ddp` adds to a launch: the live `progress` table in the cell, and `max_restarts`
    (as torchrun's: a run whose worker died goes on from its last completed epoch, up to that many times)."""
    progress: bool = True
    max_restarts: int = 0
    def __post_init__(self):
        n = self.max_restarts
        if isinstance(n, bool) or not isinstance(n, int) or n < 0: raise ArgumentError(f"max_restarts must be an int >= 0, got {n!r}")

_OPTION_RECORDS = (LaunchOptions, GroupOptions, FitOptions, DDPOptions)

def _default_nprocs(nprocs: int | None) -> int:
    if nprocs is not None: return check_nprocs(nprocs)
    n = visible_gpu_count()
    if n == 0: raise ArgumentError("nprocs is required on a machine without GPUs: e.g. fit_ddp(..., nprocs=2) for 2 CPU processes")
    return n

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
    """What `learn.ddp(nprocs=2, **options)` returns: call a schedule on it (`.fit`, `.fit_one_cycle`, `.fine_tune`,
    `.fit_flat_cos`, `.fit_sgdr`: the result is applied to the Learner), inference (`.get_preds`, `.tta`, `.validate`:
    each rank predicts its shard, the result comes back as a local call returns it) or `.lr_find` (the Learner's
    weights stay as they were; its recorder gets the lrs and losses). Each takes the Learner method's own arguments."""
    def __init__(self, learn: Learner, nprocs: int | None = None, factory: Callable | None = None, executor=None,
                 wait: bool = True, **options):
        if factory is not None and not callable(factory):
            raise ArgumentTypeError("factory must be a zero-argument function that returns a Learner")
        if executor is not None and nprocs is not None:
            raise ArgumentError("nprocs and executor= exclude each other: the executor's SLURM tasks are the ranks")
        self.learn,self.factory,self.executor,self.wait = learn,factory,executor,wait
        self.nprocs = None if executor is not None else _default_nprocs(nprocs)
        self.launch_options, self.group, self.fit_options, self.ddp = (r.take(options) for r in _OPTION_RECORDS)
        if options:
            known = [f.name for r in _OPTION_RECORDS for f in fields(r)]
            raise ArgumentTypeError(f"unexpected launch option(s): {', '.join(sorted(options))}; known: {', '.join(known)}")
        if executor is not None and self.fit_options.max_restarts:
            raise ArgumentError("max_restarts= relaunches local workers; under executor= SLURM requeues the job (preemption, "
                                "scontrol requeue) and it goes on from its last completed epoch: drop max_restarts")

    @property
    def source(self) -> Learner | Callable[[], Learner]: return self.factory or self.learn

    def __getattr__(self, name: str):
        if name.startswith('__'): raise AttributeError(name)
        raise AttributeError(f"learn.ddp(...) can run {', '.join(METHODS)}; not {name!r}")

    def _run(self, method: str, args: tuple, kwargs: dict):
        "Run `Learner.<method>(*args, **kwargs)` under DDP, its arguments checked here, before any worker starts."
        params = call_arguments(method, args, kwargs)
        if self.executor is not None: return self._submit(method, args, kwargs)
        if method in SCHEDULES:
            return self._train(self._fit_job(method, args, kwargs))
        res = self._launch(find_lr_in_worker if method == 'lr_find' else infer_in_worker,
                           DDPJob(self.source, method, kwargs=params, ddp=self.ddp), gather='all' if method in
                           ('get_preds', 'tta') else 0)
        if method == 'lr_find': return self._found_lrs(res, params)
        return res if method == 'validate' else merge_shards(res)

    def _fit_job(self, method: str, args: tuple, kwargs: dict) -> DDPJob:
        "The DDP fit of schedule `method`, with the Learner's history so far (a pickled Recorder keeps none): `start_epoch=` keeps its rows."
        job = DDPJob(self.source, method, args, kwargs, self.ddp, progress=self.fit_options.progress)
        if 'values' in vars(self.learn.recorder): job.history = recorder_history(self.learn.recorder)
        return job

    def _submit(self, method: str, args: tuple, kwargs: dict):
        "A schedule as one job of the submitit executor (`slurm`): applied here when it ends, or its `SlurmRun` if not `wait`."
        from .slurm import submit_job
        if method not in SCHEDULES: raise ArgumentError(f"learn.ddp(executor=...) runs the schedules {', '.join(SCHEDULES)}; not {method}")
        return submit_job(self.learn, self._fit_job(method, args, kwargs), self.executor, self.wait, self.launch_options.need,
                          self.launch_options.imports)

    def _launch(self, worker: Callable, job: DDPJob, gather, on_event: Callable | None = None):
        return launch(self.nprocs, worker, kwargs={'job': job}, options=self.launch_options, gather=gather,
                      ctx=self.group.group(), on_event=on_event,
                      arg_names={'learn' if job.source is self.learn else 'factory': job.source})

    def _train(self, job: DDPJob) -> None:
        """Run the fit `job`, drawing rank 0's progress here, restarting from the last completed epoch up to `max_restarts`
        times, and apply rank 0's result to the Learner: whole, even if an interrupt comes as it ends (raised after). On an
        interrupt during the fit the Learner gets the last completed epoch; on a failure it is untouched and the error
        keeps that epoch's checkpoint."""
        learn, res = self.learn, None
        ckdir = owned_tempdir('ckpt')
        try:
            job.checkpoint = os.path.join(ckdir, 'last_epoch.pth')
            cbs = L(learn.cbs) + L(job.kwargs.get('cbs'))
            display = ProgressDisplay(graph=any(is_callback_of(cb, (SHOW_GRAPH,)) for cb in cbs))
            def attempt(resumed: dict | None, restart: int) -> dict:
                return self._launch(train_in_worker, replace(job, resumed=resumed, restart=restart), gather=0, on_event=display)
            try: res = with_restarts(attempt, job.checkpoint, job.method, self.fit_options.max_restarts, display.restarting)
            except KeyboardInterrupt:
                stopped_at_checkpoint(learn, last_checkpoint(job.checkpoint), job.method, job.args)
                raise
            except LaunchError as e:
                keep_checkpoint(e, job.checkpoint)
                raise
            finally:
                try:
                    if res is not None: apply_result(learn, res)   # first: an interrupt now waits until it is applied whole
                finally: display.close()
        finally: shutil.rmtree(ckdir, ignore_errors=True)

    def _found_lrs(self, res: dict, params: dict):
        rec = self.learn.recorder
        rec.lrs, rec.losses = res['lrs'], [torch.tensor(l) for l in res['losses']]
        rec.iters, rec.values = [], []   # as a local lr_find within one epoch leaves them: no earlier fit's rows in plot_loss()
        if params['suggest_funcs'] is None: return None
        return _suggested_lrs(rec, params['num_it'], params['suggest_funcs'], params['show_plot'])


def _ddp_method(name: str) -> Callable:
    "`DDPMethods.<name>`: `Learner.<name>` under DDP, with its signature and docstring (for help, Tab and Shift-Tab)."
    original = getattr(Learner, name)
    def method(self, *args, **kwargs): return self._run(name, args, kwargs)
    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"`Learner.{name}` on the DDP workers of `learn.ddp(...)`. {inspect.getdoc(original) or ''}".strip()
    method.__signature__ = inspect.signature(original)
    return surfaces_errors(method)

for _name in METHODS: setattr(DDPMethods, _name, _ddp_method(_name))

@surfaces_errors
@with_options(*_OPTION_RECORDS)
def learner_ddp(self: Learner, nprocs: int | None = None, factory: Callable | None = None, executor=None,
                wait: bool = True, **options) -> DDPMethods:
    """Run the next call under DDP on `nprocs` workers, e.g. `learn.ddp(nprocs=2).fine_tune(3)` or `.get_preds()`; with a
    submitit `executor`, a schedule runs as one SLURM job (`wait=False`: its `SlurmRun` at once)."""
    return DDPMethods(self, nprocs, factory, executor, wait, **options)
add_method(Learner, 'ddp', learner_ddp)

@surfaces_errors
@with_options(*_OPTION_RECORDS)
def learner_fit_ddp(self: Learner, n_epoch: int, lr=None, wd=None, cbs=None, reset_opt: bool = False, start_epoch: int = 0, *,
                    nprocs: int | None = None, factory: Callable | None = None, **options) -> None:
    "`Learner.fit` on `nprocs` DDP workers; the notebook's Learner gets rank 0's weights, history and optimizer state."
    DDPMethods(self, nprocs, factory, **options).fit(n_epoch, lr=lr, wd=wd, cbs=cbs, reset_opt=reset_opt,
                                                     start_epoch=start_epoch)
add_method(Learner, 'fit_ddp', learner_fit_ddp)   # the method `learn.fit_ddp`; the module's `fit_ddp` is the function form

@surfaces_errors
@with_options(*_OPTION_RECORDS)
def fit_ddp(factory: Callable[[], Learner], n_epoch: int, lr=None, *, nprocs: int | None = None, method: str = 'fit',
            **kwargs) -> Learner:
    """Function form: build the Learner with `factory()` in each worker, train with `method` (`fit` by default; the
    schedule's own arguments go in `kwargs`), and return a Learner built here by the same factory, holding the result."""
    if not callable(factory): raise ArgumentTypeError("factory must be a zero-argument function that returns a Learner")
    if method not in SCHEDULES: raise ArgumentError(f"method must be one of {SCHEDULES}, got {method!r}")
    options = {f.name: kwargs.pop(f.name) for r in _OPTION_RECORDS for f in fields(r) if f.name in kwargs}
    if lr is not None: kwargs[_LR_NAME[method]] = lr
    methods = DDPMethods(None, nprocs, factory, **options)
    call_arguments(method, (n_epoch,), kwargs)
    methods.learn = learn = factory()
    getattr(methods, method)(n_epoch, **kwargs)
    return learn
