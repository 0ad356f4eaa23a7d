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

def tabular_learner_1m(n_rows: int = 1_000_000, n_cols: int = 30, bs: int = 4096) -> Learner:
    """A new tabular user's Learner on random data: `n_rows` x `n_cols` float32 continuous columns and a binary target,
    `TabularPandas` without procs, a random 80/20 split, fastai's default tabular model and loaders."""
    import numpy as np, pandas as pd
    from fastai.data.block import CategoryBlock
    from fastai.data.transforms import RandomSplitter
    from fastai.tabular.all import TabularPandas, tabular_learner
    rng = np.random.default_rng(0)
    names = [f'c{i}' for i in range(n_cols)]
    df = pd.DataFrame(rng.standard_normal((n_rows, n_cols), dtype=np.float32), columns=names)
    df['y'] = (df['c0'] + df['c1'] > 0).astype(np.int64)
    to = TabularPandas(df, procs=[], cont_names=names, y_names='y', y_block=CategoryBlock(),
                       splits=RandomSplitter(seed=0)(range(n_rows)))
    return tabular_learner(to.dataloaders(bs=bs), metrics=accuracy)

class PssProbe(Callback):
    "At the end of fit, appends `rank pss_kb segment_pss_kb` to the file `path` (see `bench_workers.pss_kb`)."
    def __init__(self, path: str): self.path = path
    def after_fit(self):
        from bench_workers import pss_kb
        with open(self.path, 'a') as f: f.write(f"{os.environ.get('RANK', '0')} {' '.join(map(str, pss_kb('/mpify-')))}\n")
