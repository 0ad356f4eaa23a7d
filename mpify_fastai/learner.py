"""Notebook-side API: `Learner.fit_ddp` and `Learner.ddp(...)` train in DDP workers and bring the result home.

The notebook's Learner (or a zero-argument factory building one) is shipped once; rank 0 returns weights,
recorder history and optimizer state, applied to the notebook's Learner in one step after every worker has
succeeded. On failure the notebook's Learner is untouched and the error carries the last epoch's checkpoint.
"""
from __future__ import annotations
import inspect, os, shutil, tempfile
from typing import Callable
from fastai.callback.progress import ShowGraphCallback
from fastai.learner import Learner
from fastcore.basics import patch, patch_to
from fastcore.foundation import L
from .ddp import in_torchddp, launch_in_group, visible_gpu_count
from .errors import LaunchError
from .launch import check_nprocs
from .progress import ProgressDisplay
from .training import SCHEDULES, apply_result, is_callback_of, train_in_worker

__all__ = ['fit_ddp', 'DDPSchedules', 'LAUNCH_OPTIONS']

# what `learn.ddp(...)` passes on to the launch: `in_torchddp`'s options (results always come from rank 0), and `progress`
LAUNCH_OPTIONS = tuple(n for n, p in inspect.signature(in_torchddp).parameters.items()
                       if p.kind is p.KEYWORD_ONLY and n != 'gather') + ('progress',)
_LR_NAME = {'fit': 'lr', 'fit_one_cycle': 'lr_max', 'fit_sgdr': 'lr_max', 'fine_tune': 'base_lr', 'fit_flat_cos': 'lr'}

def _default_nprocs(nprocs: int | None) -> int:
    if nprocs is not None: return nprocs
    n = visible_gpu_count()
    if n == 0: raise ValueError("nprocs is required on a machine without GPUs: e.g. fit_ddp(..., nprocs=2) for 2 CPU processes")
    return n

def _launch_training(learn: Learner, source: Learner | Callable[[], Learner], method: str, args: tuple, kwargs: dict,
                     nprocs: int | None, sync_bn: bool = True, ddp_kwargs: dict | None = None, **launch_opts) -> dict:
    "Run schedule `method` on `nprocs` DDP workers, drawing rank 0's progress here; return rank 0's result (nothing applied yet)."
    if method not in SCHEDULES: raise ValueError(f"method must be one of {SCHEDULES}, got {method!r}")
    unknown = set(launch_opts) - set(LAUNCH_OPTIONS)
    if unknown: raise TypeError(f"unexpected launch option(s): {', '.join(sorted(unknown))}; known: {', '.join(LAUNCH_OPTIONS)}")
    nprocs = check_nprocs(_default_nprocs(nprocs))
    progress = launch_opts.pop('progress', True)
    ckdir = tempfile.mkdtemp(prefix='mpify-ckpt-')
    checkpoint = os.path.join(ckdir, 'last_epoch.pth')
    cbs = L(learn.cbs) + L(kwargs.get('cbs'))
    display = ProgressDisplay(graph=any(is_callback_of(cb, ShowGraphCallback) for cb in cbs))
    try:
        return launch_in_group(nprocs, train_in_worker, (source, method, args, kwargs, checkpoint, sync_bn, ddp_kwargs or {},
                                                         progress), gather=0, on_event=display, **launch_opts)
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

class DDPSchedules:
    """What `learn.ddp(nprocs=2, **launch_options)` returns: call any of `SCHEDULES` on it (`.fit`, `.fit_one_cycle`,
    `.fine_tune`, `.fit_flat_cos`, `.fit_sgdr`) to run that schedule under DDP and apply the result to the Learner."""
    def __init__(self, learn: Learner, nprocs: int | None = None, factory: Callable | None = None, sync_bn: bool = True,
                 ddp_kwargs: dict | None = None, **launch_opts):
        if factory is not None and not callable(factory): raise TypeError("factory must be a zero-argument function that returns a Learner")
        self.learn,self.nprocs,self.factory,self.sync_bn,self.ddp_kwargs,self.launch_opts = learn,nprocs,factory,sync_bn,ddp_kwargs,launch_opts

    def __getattr__(self, method: str):
        if method not in SCHEDULES: raise AttributeError(f"DDP can run {', '.join(SCHEDULES)}; not {method!r}")
        def schedule(*args, **kwargs) -> None:
            res = _launch_training(self.learn, self.factory or self.learn, method, args, kwargs, self.nprocs, self.sync_bn,
                                   self.ddp_kwargs, **self.launch_opts)
            apply_result(self.learn, res)
        schedule.__name__ = f'{method}_ddp'
        return schedule

@patch
def ddp(self: Learner, nprocs: int | None = None, factory: Callable | None = None, sync_bn: bool = True,
        ddp_kwargs: dict | None = None, **launch_opts) -> DDPSchedules:
    "Run the next schedule call under DDP on `nprocs` workers, e.g. `learn.ddp(nprocs=2).fine_tune(3)`."
    return DDPSchedules(self, nprocs, factory, sync_bn, ddp_kwargs, **launch_opts)

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
