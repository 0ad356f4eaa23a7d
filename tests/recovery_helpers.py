"""Callbacks for the recovery tests (workers import this module by name)."""
from __future__ import annotations
import os, signal, time
from pathlib import Path
from fastai.callback.core import Callback

class KillOnce(Callback):
    """SIGKILL rank `rank` at the end of epoch `epoch`, in the first attempt only (MPIFY_RESTART_COUNT 0); rank 0 notes
    each attempt in `attempts`, and each epoch it begins as `<attempt> <epoch>` in `epochs`."""
    order = 90   # after the epoch checkpoint (70): the restart resumes right after this epoch
    def __init__(self, folder: str, epoch: int = 2, rank: int = 1): self.folder,self.at,self.rank = folder,epoch,rank
    def before_fit(self):
        if os.environ['RANK'] == '0':
            with open(Path(self.folder, 'attempts'), 'a') as f: f.write(os.environ.get('MPIFY_RESTART_COUNT', '?') + '\n')
    def before_epoch(self):
        if os.environ['RANK'] == '0':
            with open(Path(self.folder, 'epochs'), 'a') as f: f.write(f"{os.environ.get('MPIFY_RESTART_COUNT', '?')} {self.epoch}\n")
    def after_epoch(self):
        if self.epoch != self.at or os.environ.get('MPIFY_RESTART_COUNT') != '0': return
        import torch.distributed as dist
        dist.barrier()   # rank 0 has written this epoch's checkpoint when rank 1 dies
        if int(os.environ['RANK']) == self.rank: os.kill(os.getpid(), signal.SIGKILL)

class RaiseEverywhere(Callback):
    "A deterministic bug: every rank raises in epoch 1; rank 0 notes each attempt."
    def __init__(self, folder: str): self.folder = folder
    def before_fit(self):
        if os.environ['RANK'] == '0':
            with open(Path(self.folder, 'attempts'), 'a') as f: f.write(os.environ.get('MPIFY_RESTART_COUNT', '?') + '\n')
    def before_epoch(self):
        if self.epoch == 1: raise ValueError("a bug in the user's code")

class SlowEpochs(Callback):
    "Each epoch takes at least `seconds`; rank 0 writes `folder/done-<epoch>` when an epoch (and its checkpoint) is over."
    order = 90
    def __init__(self, folder: str, seconds: float = 0.7): self.folder,self.seconds = folder,seconds
    def before_epoch(self): self.t = time.monotonic()
    def after_epoch(self):
        time.sleep(max(0., self.seconds - (time.monotonic() - self.t)))
        if os.environ['RANK'] == '0': Path(self.folder, f'done-{self.epoch}').write_text('done')

class EpochsTrained(Callback):
    "Rank 0 appends each epoch it trains (not one skipped on the way to `start_epoch`) to `folder/<fname>`, one a line."
    def __init__(self, folder: str, fname: str): self.folder,self.fname = folder,fname
    def before_train(self):
        if os.environ['RANK'] == '0':
            with open(Path(self.folder, self.fname), 'a') as f: f.write(f"{self.epoch}\n")

def stuck_in_collective():
    "Rank 0 waits in an all_reduce that rank 1, asleep, never joins: a hang to diagnose."
    import torch, torch.distributed as dist
    if dist.get_rank() == 1: time.sleep(60)
    t = torch.ones(1)
    dist.all_reduce(t)

def child_ignoring_sigterm(folder: str, then: str = 'raise'):
    "Start a child process that ignores SIGTERM, note its pid, then raise (or hang until a timeout stops us)."
    import subprocess, sys
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"
    child = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    child.stdout.readline()                      # SIGTERM is ignored from here on
    Path(folder, f"child-{os.environ['RANK']}").write_text(str(child.pid))
    if then == 'raise' and os.environ['RANK'] == '1': raise RuntimeError('failing with a stubborn child')
    time.sleep(120)

def sum_and_big_result(x, n_result: int):
    "The sum of what came in, and a result of `n_result` float32s (4 bytes each) that must travel home."
    import torch
    return float(x.sum()), torch.full((n_result,), float(os.environ['RANK']))

def cleans_up_on_sigterm(folder: str):
    """Rank 0 handles SIGTERM with 0.3 s of clean-up that writes `term-0`; rank 1 raises once rank 0's handler is in
    place: the launch's stop must leave rank 0 that long before its SIGKILL."""
    import signal
    rank = os.environ['RANK']
    if rank == '0':
        def clean_up(signum, frame):
            time.sleep(0.3)
            Path(folder, 'term-0').write_text('cleaned up')
            os._exit(0)
        signal.signal(signal.SIGTERM, clean_up)
        Path(folder, 'ready-0').write_text('')
        time.sleep(60)
    while not Path(folder, 'ready-0').exists(): time.sleep(0.01)
    raise RuntimeError('rank 1 fails')

def attempt_number() -> int:
    "Which attempt this is, 0 for the first: a local restart's, torchrun's or a requeued SLURM job's count."
    for k in ('MPIFY_RESTART_COUNT', 'TORCHELASTIC_RESTART_COUNT', 'SLURM_RESTART_COUNT'):
        if os.environ.get(k): return int(os.environ[k])
    return 0

MOMENTS = ('first_epoch', 'last_epoch', 'last_epoch_end', 'result')

class StopAt(Callback):
    """In the first attempt only, at `moment`: 'first_epoch' (its first batch, nothing checkpointed yet), 'last_epoch'
    (the last epoch's first batch), 'last_epoch_end' (the last epoch checkpointed, the fit not ended) or 'result' (the fit
    over and rank 0's finished result saved; with `result`, once that file exists, its mtime and size noted in
    `folder/result-seen`), rank `rank` is SIGKILLed (`how` 'kill'), or writes `folder/stopped` and sleeps for the test to
    requeue its job (`how` 'pause'), or until the test writes `folder/go` (`how` 'hold'). Rank 0 notes each epoch it trains as '<attempt> <epoch>' in `folder/epochs`, each
    attempt in `folder/attempts`. Order 90: after the epoch checkpoint (70)."""
    order = 90
    def __init__(self, folder: str, moment: str, how: str = 'kill', rank: int = 1, result: str | None = None):
        assert moment in MOMENTS and how in ('kill', 'pause', 'hold'), (moment, how)
        self.folder,self.moment,self.how,self.rank,self.result = folder,moment,how,rank,result
    def before_fit(self): self._note('attempts', attempt_number())
    def before_train(self): self._note('epochs', f"{attempt_number()} {self.epoch}")
    def _note(self, name: str, line):
        if os.environ.get('RANK', '0') == '0':
            with open(Path(self.folder, name), 'a') as f: f.write(f"{line}\n")
    def after_batch(self):
        at = {'first_epoch': 0, 'last_epoch': self.n_epoch - 1}.get(self.moment)
        if self.training and self.iter == 0 and self.epoch == at: self._stop(barrier=False)   # peers wait in the next step
    def after_epoch(self):
        if self.moment == 'last_epoch_end' and self.epoch == self.n_epoch - 1: self._stop()
    def after_fit(self):
        if self.moment == 'result': self._stop()
    def _stop(self, barrier: bool = True):
        if attempt_number() != 0: return
        import torch.distributed as dist
        if barrier and dist.is_initialized() and dist.get_world_size() > 1: dist.barrier()   # rank 0 saved what came before
        if int(os.environ.get('RANK', '0')) != self.rank: return
        if self.result:
            while not os.path.exists(self.result): time.sleep(0.05)
            st = os.stat(self.result)
            Path(self.folder, 'result-seen').write_text(f"{st.st_mtime_ns} {st.st_size}")
        if self.how == 'kill': os.kill(os.getpid(), signal.SIGKILL)
        Path(self.folder, 'stopped').write_text(self.moment)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (self.how == 'hold' and Path(self.folder, 'go').exists()): time.sleep(0.05)
