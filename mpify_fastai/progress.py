"""The live progress display of a DDP fit: rank 0 sends fastai's progress as events; the caller draws them.

In Jupyter the caller's fastprogress renders the same live HTML bars and metrics table as a local `fit`;
in a terminal, the console version. Workers never draw anything themselves.
"""
from __future__ import annotations
import os, pickle, struct, time
from dataclasses import dataclass
from typing import Callable
from fastai.callback.core import Callback
from .worker import send_event

__all__ = ['ProgressEvents', 'ProgressDisplay', 'EventLog', 'FitStarted', 'EpochStarted', 'BarStarted', 'BatchDone',
           'RowLogged', 'FitEnded', 'FitResumed', 'epochs_done']

_BATCH_EVERY = 0.2   # seconds between batch updates sent from the worker

def _fmt(log) -> list[str]: return [f'{v:.6f}' if isinstance(v, float) else str(v) for v in log]

def epochs_done(done: int, n: int | None = None) -> str:
    """Every message's words for progress: a count, then the table's rows (fastai numbers epochs from 0), e.g.
    '3 of 10 epochs done (epochs 0-2)'; `start_epoch=done` goes on from there."""
    rows = '' if done == 0 else ' (epoch 0)' if done == 1 else f' (epochs 0-{done - 1})'
    return f"{done}{f' of {n}' if n else ''} epoch{'' if done == 1 and not n else 's'} done{rows}"

# ---------------------------------------------------------------- the events, rank 0 to the caller

@dataclass(frozen=True)
class FitStarted:
    "A fit of `n_epoch` epochs begins; `names` heads the table."
    n_epoch: int
    names: list[str]

@dataclass(frozen=True)
class EpochStarted:
    epoch: int

@dataclass(frozen=True)
class BarStarted:
    "A training or validation pass of `total` batches begins."
    total: int

@dataclass(frozen=True)
class BatchDone:
    "`done` batches of the pass are done; `loss` is the smoothed training loss (None while validating)."
    done: int
    loss: float | None

@dataclass(frozen=True)
class RowLogged:
    "An epoch's table row, the per-batch losses since the last row, and its validation loss (for the loss graph)."
    cells: list[str]
    losses: list[float]
    val_loss: float | None

@dataclass(frozen=True)
class FitEnded:
    "The fit is over."

@dataclass(frozen=True)
class FitResumed:
    "A restarted attempt (`attempt`: 1 for the first restart) goes on from `epoch`, in the same table."
    epoch: int
    attempt: int

class EventLog:
    """Progress events through a file (a job's folder, shared by a cluster's nodes): rank 0 `append`s, the caller
    `read`s what is new. Each event is one length-prefixed pickle written with one `write`, so a reader never takes half."""
    def __init__(self, path: str | os.PathLike): self.path,self.offset = os.fspath(path),0
    def append(self, event) -> None:
        data = pickle.dumps(event)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try: os.write(fd, struct.pack('<Q', len(data)) + data)
        finally: os.close(fd)
    def read(self) -> list:
        "The events appended since the last `read`."
        try:
            with open(self.path, 'rb') as f: f.seek(self.offset); data = f.read()
        except FileNotFoundError: return []
        out, i = [], 0
        while i + 8 <= len(data) and i + 8 + (n := struct.unpack_from('<Q', data, i)[0]) <= len(data):
            out.append(pickle.loads(data[i + 8:i + 8 + n])); i += 8 + n
        self.offset += i
        return out

class ProgressEvents(Callback):
    "Rank 0's stand-in for `ProgressCallback`: sends what it would draw to the caller (with `send`: `send_event`, or `EventLog.append`)."
    order = 60
    def __init__(self, send: Callable = send_event): self.send = send
    def before_fit(self):
        self.old_logger, self.learn.logger, self.sent = self.learn.logger, self._row, 0
        self.send(FitStarted(self.n_epoch, _fmt(self.recorder.metric_names)))
    def before_epoch(self): self.send(EpochStarted(self.epoch))
    def before_train(self): self._bar()
    def before_validate(self): self._bar()
    def _bar(self):
        self.last = 0.
        self.send(BarStarted(len(self.dl)))
    def after_batch(self):
        now = time.monotonic()
        if now - self.last >= _BATCH_EVERY or self.iter + 1 == self.n_iter:
            self.last = now
            loss = float(self.smooth_loss) if self.training and hasattr(self, 'smooth_loss') else None
            self.send(BatchDone(self.iter + 1, loss))
    def _row(self, log):
        rec = self.recorder
        new, self.sent = [float(l) for l in rec.losses[self.sent:]], len(rec.losses)
        self.send(RowLogged(_fmt(log), new, float(rec.values[-1][1]) if rec.values and len(rec.values[-1]) > 1 else None))
    def after_fit(self):
        self.learn.logger = self.old_logger
        self.send(FitEnded())

class ProgressDisplay:
    """Caller side: turns rank 0's progress events into a fastprogress master bar and table (HTML in Jupyter),
    plus the loss graph of `ShowGraphCallback` when `graph`."""
    def __init__(self, graph: bool = False):
        self.mbar,self.pbar,self.graph,self.resume_at = None,None,graph,None
        self.losses,self.val_losses,self.epoch_ends,self.n_epoch = [],[],[],0

    def __call__(self, rank: int, event=None, *_):
        "An `on_event` handler: draws rank 0's progress events, ignores everything else."
        if rank != 0: return
        match event:
            case FitStarted(n_epoch, names): self._fit(n_epoch, names)
            case EpochStarted(epoch): self._epoch(epoch)
            case BarStarted(total): self._bar(total)
            case BatchDone(done, loss): self._batch(done, loss)
            case RowLogged(cells, losses, val_loss): self._row(cells, losses, val_loss)
            case FitEnded(): self._end()

    def restarting(self, message: str, epoch: int):
        "Say why the run restarts; its new attempt resumes at `epoch` in this same table, without the rows it skips."
        if self.mbar is None: print(message, flush=True)
        else: self.mbar.write(message)
        self.resume_at = epoch

    def _fit(self, n_epoch: int, names: list[str]):
        from fastprogress.fastprogress import master_bar
        if self.resume_at is not None and self.mbar is not None: return
        self.n_epoch,self.losses,self.val_losses,self.epoch_ends = n_epoch,[],[],[]
        self.mbar = master_bar(list(range(n_epoch)))
        # as fastai's ProgressCallback: no on_iter_begin here. The first `update(0)` begins the bar and opens the one
        # display; beginning it here too opened a second display, left behind holding the header and a stray repr.
        self.mbar.write(names, table=True)
    def _epoch(self, epoch: int):
        if self.mbar: self.mbar.update(epoch)
    def _bar(self, n: int):
        from fastprogress.fastprogress import progress_bar
        if self.pbar is not None: self.pbar.on_iter_end()
        self.pbar = progress_bar(range(n), parent=self.mbar, leave=False)
        self.pbar.update(0)
    def _batch(self, i: int, loss: float | None):
        if self.pbar is None: return
        if loss is not None: self.pbar.comment = f'{loss:.4f}'
        self.pbar.update(i)
    def _row(self, cells: list[str], losses: list[float] = (), val_loss: float | None = None):
        if not self.mbar or (self.resume_at is not None and int(cells[0]) < self.resume_at): return
        self.mbar.write(cells, table=True)
        self.losses += losses
        if not (self.graph and val_loss is not None and self.losses): return
        self.epoch_ends.append(len(self.losses)); self.val_losses.append(val_loss)
        per_epoch = self.epoch_ends[0]
        x_max = (self.n_epoch - len(self.epoch_ends)) * per_epoch + len(self.losses)
        self.mbar.update_graph([(list(range(len(self.losses))), self.losses), (self.epoch_ends, self.val_losses)],
                               (0, x_max), (0, max(max(self.losses), max(self.val_losses))))
    def _end(self):
        if self.pbar is not None: self.pbar.on_iter_end(); self.pbar = None
        if self.mbar is not None: self.mbar.on_iter_end(); self.mbar = None
        self.resume_at = None
    def close(self): self._end()
