"""mpify_fastai: run notebook-defined functions, and fastai training, on N processes; get everything back.

Importing it is cheap and imports neither fastai nor torch. It adds `Learner.fit_ddp`, `.ddp`, `.save_ddp_job`
and `.load_ddp_result` to fastai's Learner, now if fastai is loaded, else as soon as it is (either import order
works). As soon as the process has torch (imported before or after it), it also starts the warm fork server in the
background, so the first launch finds torch (and fastai) already imported there; `MPIFY_PREWARM=0` turns that off.
"""
__version__ = '0.1.0'
from .versions import check_supported as _check_supported, UnsupportedVersionError
_check_supported()   # outside the tested range: one clear error now, not an AttributeError later
from .errors import (UsageError, ArgumentError, ArgumentTypeError, NeedError, LaunchError, WorkerError, WorkerDied,
                     LaunchTimeout, MainGuardError, PayloadError)
from .imports import ImportsError, global_imports, import_star
from .launch import ranch, LaunchOptions
from .worker import send_event
from .group import in_torchddp, TorchDDPCtx, GroupOptions, rank_world, local_rank, local_device, is_rank0
from .import_hooks import add_learner_methods_with_fastai as _add_learner_methods_with_fastai, when_imported as _when_imported
from .warm import prewarm as _prewarm

_FASTAI = {'fit_ddp': 'learner', 'DDPMethods': 'learner', 'DistributedRunner': 'runner',
           'apply_result': 'state', 'learner_result': 'state',
           'DDPJob': 'training', 'DDPOptions': 'training', 'InexactMetricWarning': 'metrics', 'FitOptions': 'learner', 'attach': 'slurm', 'SlurmRun': 'slurm'}

def __getattr__(name):
    "fastai parts load on first use, so `ranch`/`in_torchddp` users don't pay for importing fastai."
    if name == 'show_install':   # the report's module runs as `python -m mpify_fastai.env`: not imported with the package
        from .env import show_install
        return show_install
    if name in _FASTAI:
        import importlib
        importlib.import_module(f'{__name__}.learner')   # first: the fastai layer's import order, Learner methods added
        return getattr(importlib.import_module(f'{__name__}.{_FASTAI[name]}'), name)
    raise AttributeError(f"module 'mpify_fastai' has no attribute {name!r}")

__all__ = ['ranch', 'in_torchddp', 'TorchDDPCtx', 'LaunchOptions', 'GroupOptions', 'DDPOptions', 'FitOptions', 'DDPJob', 'rank_world', 'local_rank', 'local_device', 'is_rank0', 'send_event',
           'import_star', 'global_imports', 'fit_ddp', 'DDPMethods', 'DistributedRunner', 'apply_result', 'learner_result', 'attach', 'SlurmRun',
           'UsageError', 'ArgumentError', 'ArgumentTypeError', 'NeedError', 'LaunchError', 'WorkerError', 'WorkerDied', 'LaunchTimeout', 'MainGuardError', 'PayloadError', 'ImportsError',
           'UnsupportedVersionError', 'show_install', 'InexactMetricWarning']

_add_learner_methods_with_fastai()
# the warm launcher starts in the background as soon as this process has torch (now, or when it imports it): the
# session's first launch finds it ready
_when_imported('torch', _prewarm)
