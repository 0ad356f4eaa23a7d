"""fastai helpers for the benchmark: the digits Learner, and a callback that times epochs in a worker or locally.

Separate from bench_workers.py because it imports fastai at the top: only processes that already use fastai
import it (a `fit_ddp` worker unpickles `EpochTimer` from here by name; bench/ is on its PYTHONPATH).
"""
from __future__ import annotations
import os, tempfile, time
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from mpify_fastai.demo import digits_cnn, digits_dls

def make_learner() -> Learner:
    "The demo's Learner: a small CNN on scikit-learn's digits, bs 64."
    return Learner(digits_dls(), digits_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)

class EpochTimer(Callback):
    "Appends each epoch's wall time (training + validation) to the file `path`, on rank 0 only."
    order = 100   # after the Recorder and the DDP runner (whose after_epoch ends with a barrier)
    def __init__(self, path: str): self.path = path
    def before_epoch(self): self.t0 = time.perf_counter()
    def after_epoch(self):
        if int(os.environ.get('RANK', '0')) != 0: return
        with open(self.path, 'a') as f: f.write(f'{time.perf_counter() - self.t0}\n')

def epoch_times(fit) -> list[float]:
    "Run `fit(cbs)` with an `EpochTimer` in `cbs`; the epochs' wall times in seconds."
    fd, path = tempfile.mkstemp(prefix='mpify-bench-epochs-')
    os.close(fd)
    try:
        fit([EpochTimer(path)])
        with open(path) as f: return [float(line) for line in f if line.strip()]
    finally: os.remove(path)
