"""Helpers that torchrun workers import while running test jobs (the tests put this folder on their PYTHONPATH).
Callbacks defined here travel in a job file by reference, so they must stay importable by name."""
from __future__ import annotations
import os, signal
from fastai.callback.core import Callback

class KillRank(Callback):
    """SIGKILL rank `rank` at the end of epoch `at[attempt]`, attempt being torchrun's TORCHELASTIC_RESTART_COUNT.
    Order 0: it fires before `DistributedRunner`'s end-of-epoch barrier, so rank 0 never checkpoints that epoch."""
    order = 0
    def __init__(self, at: dict, rank: int = 1): self.at, self.rank = dict(at), rank
    def after_epoch(self):
        attempt = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0'))
        if int(os.environ.get('RANK', '0')) == self.rank and self.at.get(attempt) == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)
