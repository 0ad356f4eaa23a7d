"""Notebook-side API: `Learner.fit_ddp` and `Learner.ddp(...)` train in DDP workers and bring the result home.

The notebook's Learner (or a zero-argument factory building one) is shipped once; rank 0 returns weights,
recorder history and optimizer state, applied to the notebook's Learner in one step after every worker has
succeeded. On failure the notebook's Learner is untouched and the error carries the last epoch's checkpoint.
"""
from __future__ import annotations
import os, shutil, tempfile
from typing import Any, Callable
from fastai.learner import Learner
from torch.nn.parallel import DistributedDataParallel
from fastai.callback.progress import CSVLogger, ProgressCallback, ShowGraphCallback
from fastcore.basics import noop, patch
from fastcore.foundation import L
from .ddp import _run_in_group, group_plan, rank_world, visible_gpu_count
from .errors import LaunchError
from .launch import launch
from .relay import ProgressDisplay

__all__ = ['fit_ddp', 'DDPLauncher', 'apply_result', 'learner_result', 'RANK0_ONLY_CALLBACKS', 'SCHEDULES']

RANK0_ONLY_CALLBACKS = (CSVLogger, ProgressCallback, ShowGraphCallback)   # side effects that must happen once
_DRAWN_BY_CALLER = (ProgressCallback, ShowGraphCallback)
SCHEDULES = ('fit', 'fit_one_cycle', 'fine_tune', 'fit_flat_cos', 'fit_sgdr')
_LAUNCH_KEYS = ('backend', 'devices', 'start_method', 'timeout', 'need', 'imports', 'output', 'progress')

def _is_cb(cb, types) -> bool:
    "`cb` is an instance of `types`, or a callback class among them (fastai accepts both in `cbs`)."
    return isinstance(cb, types) or (isinstance(cb, type) and issubclass(cb, types))

def learner_result(learn: Learner) -> dict:
    "What rank 0 sends home: weights (CPU), recorder history, optimizer state and epoch counters."
    import torch
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
    import torch
    sd = res['state_dict']
    own = learn.model.state_dict()
    bad = [k for k in own if k not in sd or own[k].shape != sd[k].shape]
    if bad or len(sd) != len(own):
        raise LaunchError(f"the trained weights do not fit this Learner's model (mismatched keys: {bad[:5]})")
    learn.model.load_state_dict(sd)
    rec = learn.recorder
    for k, v in res['recorder'].items():
        if k == 'losses': v = [torch.tensor(x) for x in v]
        elif k == 'metric_names': v = L(v)
        setattr(rec, k, v)
    if res['opt'] is not None:
        if learn.opt is None: learn.create_opt()
        learn.opt.load_state_dict(res['opt'])
        for p, state in learn.opt.state.items():
            for k, v in state.items():
                if isinstance(v, torch.Tensor): state[k] = v.to(p.device)
    learn.epoch, learn.n_epoch, learn.final_record = res['epoch'], res['n_epoch'], res['final_record']

def _train_in_worker(source, method: str, args: tuple, kwargs: dict, checkpoint: str, sync_bn: bool, ddp_kwargs: dict,
                     progress: bool = True):
    "Worker side of `fit_ddp`: build or take the Learner, train it under `DistributedRunner`, rank 0 returns the result."
    import fastai.callback.schedule   # noqa: F401  (adds fit_one_cycle, fine_tune, fit_flat_cos, fit_sgdr)
    from .callback import DistributedRunner
    from .relay import ProgressEvents
    learn = source if isinstance(source, Learner) else source()
    if not isinstance(learn, Learner): raise TypeError(f"the learner factory returned {type(learn).__name__}, not a Learner")
    rank, _ = rank_world()
    if rank or not progress: learn.logger = noop
    drop = RANK0_ONLY_CALLBACKS if rank else _DRAWN_BY_CALLER   # the caller draws progress and graphs from rank 0's events
    for cb in list(learn.cbs):
        if _is_cb(cb, drop): learn.remove_cb(cb)
    if kwargs.get('cbs') is not None: kwargs = {**kwargs, 'cbs': [cb for cb in L(kwargs['cbs']) if not _is_cb(cb, drop)]}
    extra = [DistributedRunner(sync_bn=sync_bn, checkpoint=checkpoint, **ddp_kwargs)] + ([ProgressEvents()] if rank == 0 and progress else [])
    with learn.added_cbs(extra):
        # ProgressEvents stands where fastai's ProgressCallback stood: first among callbacks of its order (60), so a
        # CSVLogger (or any logger) on the Learner chains to the logger it installs, exactly as in a local fit.
        lead = extra[1:]
        learn.cbs = L(lead + [cb for cb in learn.cbs if not any(cb is x for x in lead)])
        getattr(learn, method)(*args, **kwargs)
    return learner_result(learn) if rank == 0 else None

def _default_nprocs(nprocs: int | None) -> int:
    if nprocs is not None: return nprocs
    n = visible_gpu_count()
    if n == 0: raise ValueError("nprocs is required on a machine without GPUs: e.g. fit_ddp(..., nprocs=2) for 2 CPU processes")
    return n

def _run(learn: Learner | None, source: Any, method: str, args: tuple, kwargs: dict, nprocs: int | None,
         sync_bn: bool = True, ddp_kwargs: dict | None = None, **launch_opts) -> dict:
    "Launch `method` on `nprocs` DDP workers; return rank 0's result (nothing applied yet)."
    from .launch import _check_nprocs
    if method not in SCHEDULES: raise ValueError(f"method must be one of {SCHEDULES}, got {method!r}")
    unknown = set(launch_opts) - set(_LAUNCH_KEYS)
    if unknown: raise TypeError(f"unexpected launch option(s): {', '.join(sorted(unknown))}; known: {', '.join(_LAUNCH_KEYS)}")
    nprocs = _check_nprocs(_default_nprocs(nprocs))
    backend, devices, progress = launch_opts.pop('backend', None), launch_opts.pop('devices', None), launch_opts.pop('progress', True)
    ckdir = tempfile.mkdtemp(prefix='mpify-ckpt-')
    checkpoint = os.path.join(ckdir, 'last_epoch.pth')
    cbs = L(getattr(learn, 'cbs', [])) + L(kwargs.get('cbs'))
    display = ProgressDisplay(graph=any(_is_cb(cb, ShowGraphCallback) for cb in cbs))
    try:
        with group_plan(nprocs, backend, devices) as env:
            res = launch(nprocs, _run_in_group, (_train_in_worker, source, method, args, kwargs, checkpoint, sync_bn,
                                                 ddp_kwargs or {}, progress), gather=0, env=env, on_event=display, **launch_opts)
        return res
    except LaunchError as e:
        if os.path.exists(checkpoint):
            kept = os.path.join(tempfile.gettempdir(), f'mpify-recovered-{os.getpid()}-{os.path.basename(ckdir)}.pth')
            shutil.move(checkpoint, kept)
            e.checkpoint = kept
            e.args = (f"{e.args[0]}\n\nThe weights of the last completed epoch are saved in {kept}: "
                      f"learn.model.load_state_dict(torch.load({kept!r})['state_dict'])",)
        raise
    finally:
        display.close()
        shutil.rmtree(ckdir, ignore_errors=True)

class DDPLauncher:
    """`learn.ddp(nprocs=2, **launch_options)` returns one of these: call any of `SCHEDULES` on it
    (`.fit`, `.fit_one_cycle`, `.fine_tune`, `.fit_flat_cos`, `.fit_sgdr`) to run it under DDP."""
    def __init__(self, learn: Learner, nprocs: int | None = None, factory: Callable | None = None, sync_bn: bool = True,
                 ddp_kwargs: dict | None = None, **launch_opts):
        if factory is not None and not callable(factory): raise TypeError("factory must be a zero-argument function that returns a Learner")
        self.learn,self.nprocs,self.factory,self.sync_bn,self.ddp_kwargs,self.launch_opts = learn,nprocs,factory,sync_bn,ddp_kwargs,launch_opts

    def __getattr__(self, method: str):
        if method not in SCHEDULES: raise AttributeError(f"DDP can run {', '.join(SCHEDULES)}; not {method!r}")
        def run(*args, **kwargs) -> None:
            res = _run(self.learn, self.factory or self.learn, method, args, kwargs, self.nprocs, self.sync_bn,
                       self.ddp_kwargs, **self.launch_opts)
            apply_result(self.learn, res)
        run.__name__ = f'{method}_ddp'
        return run

@patch
def ddp(self: Learner, nprocs: int | None = None, factory: Callable | None = None, sync_bn: bool = True,
        ddp_kwargs: dict | None = None, **launch_opts) -> DDPLauncher:
    "Run the next schedule call under DDP on `nprocs` workers, e.g. `learn.ddp(nprocs=2).fine_tune(3)`."
    return DDPLauncher(self, nprocs, factory, sync_bn, ddp_kwargs, **launch_opts)

@patch
def fit_ddp(self: Learner, n_epoch: int, lr=None, wd=None, cbs=None, reset_opt: bool = False, start_epoch: int = 0, *,
            nprocs: int | None = None, factory: Callable | None = None, sync_bn: bool = True, ddp_kwargs: dict | None = None,
            **launch_opts) -> None:
    "`Learner.fit` on `nprocs` DDP workers; the notebook's Learner gets rank 0's weights, history and optimizer state."
    self.ddp(nprocs, factory, sync_bn, ddp_kwargs, **launch_opts).fit(n_epoch, lr=lr, wd=wd, cbs=cbs, reset_opt=reset_opt,
                                                                       start_epoch=start_epoch)

def fit_ddp(factory: Callable[[], Learner], n_epoch: int, lr=None, *, nprocs: int | None = None, method: str = 'fit',
            **kwargs) -> Learner:
    """Function form: build the Learner with `factory()` in each worker, train with `method` (`fit` by default),
    and return a Learner built here by the same factory, holding the trained result."""
    if not callable(factory): raise TypeError("factory must be a zero-argument function that returns a Learner")
    launch_opts = {k: kwargs.pop(k) for k in list(kwargs) if k in _LAUNCH_KEYS}
    sync_bn, ddp_kwargs = kwargs.pop('sync_bn', True), kwargs.pop('ddp_kwargs', None)
    learn = factory()
    if lr is not None: kwargs['lr' if method == 'fit' else 'lr_max' if method in ('fit_one_cycle', 'fit_sgdr') else 'base_lr' if method == 'fine_tune' else 'lr'] = lr
    res = _run(learn, factory, method, (n_epoch,), kwargs, nprocs, sync_bn, ddp_kwargs, **launch_opts)
    apply_result(learn, res)
    return learn


from . import job as _job   # noqa: E402  (adds Learner.save_ddp_job / Learner.load_ddp_result)
