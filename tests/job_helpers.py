"""Helpers that torchrun workers import while running test jobs (the tests put this folder on their PYTHONPATH).
Callbacks defined here travel in a job file by reference, so they must stay importable by name."""
from __future__ import annotations
import os, signal
from fastai.callback.core import Callback

class KillRank(Callback):
    """SIGKILL rank `rank` at the end of epoch `at[attempt]`, attempt being torchrun's TORCHELASTIC_RESTART_COUNT.
    Order 90, after the job's checkpoint (70), and behind a barrier of all ranks: rank 0 has checkpointed that epoch
    when rank 1 dies, whatever barriers the training callbacks hold, so the restart resumes right after it."""
    order = 90
    def __init__(self, at: dict, rank: int = 1): self.at, self.rank = dict(at), rank
    def after_epoch(self):
        if self.at.get(int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0'))) != self.epoch: return
        import torch.distributed as dist
        if dist.is_initialized() and dist.get_world_size() > 1: dist.barrier()
        if int(os.environ.get('RANK', '0')) == self.rank: os.kill(os.getpid(), signal.SIGKILL)
