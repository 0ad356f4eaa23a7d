"""Recovery of a DDP fit, in one place: each completed epoch checkpointed by rank 0, which failures are retried (a dead
worker, a collective broken by a peer that went away; never a Python error of the user's code), the restarts from the
last completed epoch, the epoch kept on an interrupt or a failure, and the resume of a fit (`start_epoch=`, torchrun
restarts) with every earlier row kept in front.
"""
from __future__ import annotations
import os, shutil, tempfile
from pathlib import Path
from typing import Callable
import torch
from fastai.callback.core import Callback
from fastai.learner import Learner, SkipToEpoch
from fastcore.foundation import L
from .errors import LaunchError, WorkerDied, WorkerError
from .files import atomic_write
from .group import peer_failure, rank_world
from .progress import epochs_done
from .state import apply_result, learner_result, recorder_history

__all__ = ['RESUMABLE', 'EpochCheckpoint', 'ResumedHistory', 'merged_history', 'resume_kwargs', 'resume_callbacks',
           'resumable_checkpoint', 'restartable', 'last_checkpoint', 'stopped_at_checkpoint', 'keep_checkpoint',
           'with_restarts']

RESUMABLE = ('fit', 'fit_one_cycle', 'fit_flat_cos', 'fit_sgdr')   # schedules that take start_epoch

def merged_history(hist: dict, old: dict, done: int) -> dict:
    """The history of a resumed fit (`hist`, as `learner_result` gives it) with the `done` epochs of a checkpoint's
    history (`old`) in front: the resumed fit's rows for the skipped epochs are empty, its iteration counts restart."""
    hist = dict(hist)
    hist['values'] = list(old['values'][:done]) + list(hist['values'][done:])
    hist['losses'] = list(old['losses']) + list(hist['losses'])
    hist['lrs'] = list(old['lrs']) + list(hist['lrs'])
    off = old['iters'][done - 1] if done else 0
    hist['iters'] = list(old['iters'][:done]) + [i + off for i in hist['iters'][done:]]
    return hist

class EpochCheckpoint(Callback):
    """Rank 0 saves `learner_result` plus `completed_epoch` (and `tags`) to `path` at each epoch end, atomically, after
    the Recorder's row, and at the fit's end its result, marked `finished` (a restart that finds it trains nothing). In a
    fit that starts at `start_epoch` after the epochs of `history`, it skips the epochs before and saves the whole history,
    so a resume from it (or a second restart) has every row."""
    order = 70
    def __init__(self, path: str | os.PathLike, start_epoch: int = 0, history: dict | None = None, **tags):
        self.path,self.start,self.history,self.tags = path,start_epoch,history,tags
    def after_epoch(self):
        if rank_world()[0] != 0 or self.epoch < self.start: return
        res = learner_result(self.learn)
        if self.history: res['recorder'] = merged_history(res['recorder'], self.history, self.start)
        self._save(res)
    def after_fit(self):   # after ResumedHistory (51): the rows are whole
        if rank_world()[0] == 0: self._save(learner_result(self.learn), finished=True)
    def _save(self, res: dict, **marks):
        atomic_write(self.path, lambda f: torch.save({**res, 'completed_epoch': self.epoch, **marks, **self.tags}, f))

class ResumedHistory(Callback):
    "After a fit that skipped to `start_epoch`: the rows and losses of `history`'s epochs before it back in front."
    order = 51
    def __init__(self, history: dict, start_epoch: int): self.history,self.start = history,start_epoch
    def after_fit(self):
        rec = self.recorder
        hist = merged_history(recorder_history(rec), self.history, self.start)
        rec.values, rec.lrs, rec.iters = hist['values'], hist['lrs'], hist['iters']
        rec.losses = [torch.tensor(x) for x in hist['losses']]

def resume_kwargs(method: str, kwargs: dict, start_epoch: int) -> dict:
    "Keyword arguments that make `method` skip to `start_epoch`."
    kwargs = {**kwargs, 'start_epoch': start_epoch}
    if method == 'fit_flat_cos':   # fastai's fit_flat_cos accepts start_epoch but passes 0 on to fit
        kwargs['cbs'] = L(kwargs.get('cbs')) + [SkipToEpoch(start_epoch)]
    return kwargs

def resume_callbacks(learn: Learner, method: str, kwargs: dict, checkpoint: str | os.PathLike, resumed: dict | None = None,
                     history: dict | None = None, **tags) -> tuple[dict, list]:
    """The schedule's kwargs and the callbacks of a fit that checkpoints each epoch to `checkpoint` and goes on from
    where an earlier one stopped: from checkpoint `resumed` (applied to `learn` here), or from the user's own
    `start_epoch=` after the epochs of `history` (`recorder_history` of the caller's Learner: a pickled Recorder
    keeps no history), whose rows are kept in front."""
    if resumed is not None:
        apply_result(learn, resumed)
        kwargs, history = resume_kwargs(method, kwargs, resumed['completed_epoch'] + 1), resumed['recorder']
    start = kwargs.get('start_epoch', 0) if method in RESUMABLE else 0
    if start and method == 'fit_flat_cos' and resumed is None: kwargs = resume_kwargs(method, kwargs, start)
    if not (start and history and len(history['values']) >= start): history = None
    return kwargs, [EpochCheckpoint(checkpoint, start, history, **tags)] + ([ResumedHistory(history, start)] if history else [])

def resumable_checkpoint(checkpoint: Path, method: str, digest: str) -> dict | None:
    """The torchrun checkpoint to go on from: one this very job (`digest`) wrote, for a schedule that can skip epochs, or
    its `finished` result (any schedule)."""
    if not checkpoint.exists(): return None
    ck = torch.load(checkpoint, weights_only=False)
    if ck.get('job_digest') != digest:
        print(f"mpify_fastai: ignoring {checkpoint}: another job wrote it; starting from epoch 0", flush=True)
        return None
    return ck if method in RESUMABLE or ck.get('finished') else None

# ---------------------------------------------------------------- the caller's side: restarts, interrupts, failures

def restartable(e: LaunchError) -> bool:
    "A worker died, or a collective failed because a peer went away: worth a restart. A Python error in user code is not."
    return isinstance(e, WorkerDied) or (isinstance(e, WorkerError) and peer_failure(e))

def last_checkpoint(path: str) -> dict | None:
    "The last completed epoch's state a run left at `path`, if any."
    return torch.load(path, weights_only=False) if os.path.exists(path) else None

def stopped_at_checkpoint(learn: Learner, ck: dict | None, method: str, args: tuple) -> None:
    "After an interrupt: the Learner gets the last completed epoch's state, and one line says so and how to go on."
    if ck is None: return print("mpify_fastai: stopped before epoch 0 ended; the Learner is as it was", flush=True)
    apply_result(learn, ck)
    done = ck['completed_epoch'] + 1
    if method not in RESUMABLE:   # fine_tune: its two fits' epochs are not one count
        return print(f"mpify_fastai: stopped during {method}; the Learner holds its last completed epoch; {method} cannot "
                     "skip epochs: run it again, or go on with learn.ddp(...).fit_one_cycle(...)", flush=True)
    print(f"mpify_fastai: stopped with {epochs_done(done, ck['n_epoch'])}; the Learner holds them; to go on: "
          f"learn.ddp(...).{method}({', '.join(map(repr, args))}, ..., start_epoch={done})", flush=True)

def keep_checkpoint(e: LaunchError, path: str) -> None:
    "A failed run's last completed epoch moves out of the call's folder into a file named in `e` (`e.checkpoint`)."
    if not os.path.exists(path): return
    kept = os.path.join(tempfile.gettempdir(), f'mpify-recovered-{os.getpid()}-{os.path.basename(os.path.dirname(path))}.pth')
    shutil.move(path, kept)
    e.checkpoint = kept
    e.args = (f"{e.args[0]}\n\nThe last completed epoch (weights, optimizer, history) is saved in {kept}: "
              f"learn.load_ddp_result({kept!r}) applies it to the Learner",)

def with_restarts(attempt: Callable[[dict | None, int], dict], checkpoint: str, method: str, max_restarts: int,
                  say: Callable[[str, int], None]) -> dict:
    """`attempt(resumed, restart)` until it returns, relaunched from the last completed epoch in `checkpoint` (None for a
    schedule that cannot skip epochs) after each restartable failure, up to `max_restarts` times; `say(message, epoch)`
    tells the user why and from where. A failure after rank 0 saved its `finished` result returns that result, relaunching
    nothing."""
    restart = 0
    while True:
        try: return attempt(last_checkpoint(checkpoint) if restart and method in RESUMABLE else None, restart)
        except LaunchError as e:
            if restartable(e) and (ck := last_checkpoint(checkpoint)) is not None and ck.get('finished'):
                say(f"mpify_fastai: {e.args[0].splitlines()[0]} after rank 0 had written the result: the run is finished, "
                    "nothing restarts", ck['completed_epoch'] + 1)
                return ck
            if restart >= max_restarts or not restartable(e): raise
            restart += 1
            ck = last_checkpoint(checkpoint) if method in RESUMABLE else None
            epoch = ck['completed_epoch'] + 1 if ck else 0
            say(f"mpify_fastai: {e.args[0].splitlines()[0]}; restart {restart} of {max_restarts}, with "
                f"{epochs_done(epoch, ck and ck['n_epoch'])}: training from epoch {epoch}", epoch)
