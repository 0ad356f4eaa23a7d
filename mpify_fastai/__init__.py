"""mpify_fastai: run notebook-defined functions, and fastai training, on N processes; get everything back."""
__version__ = '0.1.0'
from .errors import LaunchError, WorkerError, WorkerDied, LaunchTimeout, MainGuardError, PayloadError
from .imports import ImportsError, import_star
from .launch import ranch, send_event
from .ddp import in_torchddp, TorchDDPCtx, rank_world, local_rank, local_device, is_rank0

def __getattr__(name):
    "fastai parts load on first use, so `ranch`/`in_torchddp` users don't pay for importing fastai."
    if name in _FASTAI:
        from . import learner, callback
        return getattr(learner if hasattr(learner, name) else callback, name)
    raise AttributeError(f"module 'mpify_fastai' has no attribute {name!r}")

_FASTAI = ('fit_ddp', 'DDPLauncher', 'DistributedRunner', 'apply_result', 'learner_result')

__all__ = ['ranch', 'in_torchddp', 'TorchDDPCtx', 'rank_world', 'local_rank', 'local_device', 'is_rank0',
           'fit_ddp', 'DDPLauncher', 'DistributedRunner', 'apply_result', 'learner_result', 'send_event', 'import_star', 'LaunchError', 'WorkerError', 'WorkerDied', 'LaunchTimeout',
           'MainGuardError', 'PayloadError', 'ImportsError']

import sys as _sys
if 'fastai.learner' in _sys.modules: from . import learner as _learner   # adds Learner.fit_ddp / Learner.ddp
if 'torch' in _sys.modules:
    from .warm import prewarm as _prewarm
    _prewarm()     # start the warm launcher now, in the background: the session's first launch finds it ready
