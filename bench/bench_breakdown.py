"""Where the seconds of a `fit_ddp` call go that a local `fit` does not spend (issue 24).

`python bench/bench_breakdown.py tabular [ROWS] [ROUNDS] [EPOCHS]` (default 2,000,000 rows, 2 rounds, 1 epoch): the
issue's Learner (12 continuous and 2 categorical columns, Categorify/FillMissing/Normalize, a regression target,
bs 8192); alternates a local `fit(EPOCHS)` and `learn.ddp(nprocs=2).fit(EPOCHS)`.
`python bench/bench_breakdown.py jpeg [FILES] [ROUNDS]` (default 1,600 files): JPEG files made from scikit-learn's digits
(96x96, coloured, noisy), `Resize(64)`, `aug_transforms()`, fastai's default loader workers, `vision_learner(resnet18,
pretrained=False)`; alternates a local `fine_tune(2)` and `learn.ddp(nprocs=2).fine_tune(2)`.
Both start the warm server with a first DDP call, and keep fastai's progress display as a user has it. Rank 0 stamps its
fits' events; the caller times shipping (`serialize.dumps`) and applying the result. Prints a markdown table of medians
and the raw numbers as JSON.
"""
from __future__ import annotations
import json, os, statistics, sys, tempfile, time
from pathlib import Path
import numpy as np, pandas as pd
from fastai.tabular.all import (Categorify, FillMissing, Normalize, RandomSplitter, TabularPandas, rmse,
                                tabular_learner)
from fastai.callback.core import Callback
import mpify_fastai
from mpify_fastai import launch as launch_module, learner as learner_module

def make_learner(n_rows: int, bs: int = 8192):
    "The issue's Learner: 12 continuous columns (one with 1% missing), 2 categorical, a float target."
    rng = np.random.default_rng(0)
    cont = [f'x{i}' for i in range(12)]
    df = pd.DataFrame(rng.standard_normal((n_rows, 12)).astype(np.float32), columns=cont)
    df.loc[rng.random(n_rows) < 0.01, 'x3'] = np.nan
    df['a'], df['b'] = rng.choice(['u', 'v', 'w', 'z'], n_rows), rng.integers(0, 50, n_rows).astype(str)
    df['y'] = (df['x0'] + df['x1'] + rng.standard_normal(n_rows) * .5).astype(np.float32)
    to = TabularPandas(df, procs=[Categorify, FillMissing, Normalize], cat_names=['a', 'b'], cont_names=cont, y_names='y',
                       splits=RandomSplitter(seed=0)(range(n_rows)))
    return tabular_learner(to.dataloaders(bs=bs), metrics=rmse)

def make_jpeg_learner(n_files: int):
    "`n_files` JPEGs in class folders (digits upscaled to 96x96, tinted, noisy) under a vision_learner, as fastbook's chapter 1."
    from PIL import Image
    from sklearn.datasets import load_digits
    from fastai.vision.all import (ImageDataLoaders, Resize, aug_transforms, error_rate, resnet18, vision_learner)
    root = Path(tempfile.mkdtemp(prefix='mpify-bench-jpeg-'))
    d, rng = load_digits(), np.random.default_rng(0)
    for i in range(n_files):
        k = i % len(d.images)
        g = np.kron(d.images[k] / 16, np.ones((12, 12)))
        rgb = np.clip(g[..., None] * rng.uniform(0.5, 1, 3) * 255 + rng.normal(0, 20, (96, 96, 3)), 0, 255).astype(np.uint8)
        (root / str(d.target[k])).mkdir(exist_ok=True)
        Image.fromarray(rgb).save(root / str(d.target[k]) / f'{i}.jpg', quality=90)
    dls = ImageDataLoaders.from_folder(root, valid_pct=0.2, seed=42, item_tfms=Resize(64), batch_tfms=aug_transforms(), bs=64)
    return vision_learner(dls, resnet18, pretrained=False, metrics=error_rate)

class Stamps(Callback):
    "Rank 0 appends `event wall-clock-time` lines to `path` at its fits' events."
    order = 100
    def __init__(self, path: str): self.path = path
    def _stamp(self, what: str):
        if int(os.environ.get('RANK', '0')) == 0:
            with open(self.path, 'a') as f: f.write(f"{what} {time.time()}\n")
    def before_fit(self): self._stamp('before_fit')
    def before_epoch(self): self._stamp('before_epoch')
    def after_epoch(self): self._stamp('after_epoch')
    def after_fit(self): self._stamp('after_fit')

def timed(module, name: str, log: list):
    "Wrap `module.name` so that each call's seconds are appended to `log`."
    fn = getattr(module, name)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try: return fn(*args, **kwargs)
        finally: log.append(time.perf_counter() - t)
    setattr(module, name, wrapper)

def one_ddp(run, path: str, ship: list, apply: list) -> dict:
    "Run `run(cbs)` (a DDP call) and split its wall time by rank 0's stamps."
    open(path, 'w').close()
    t0 = time.time()
    run([Stamps(path)])
    t1 = time.time()
    st = [(k, float(v)) for k, v in (line.split() for line in open(path))]
    at = lambda k: [v for kk, v in st if kk == k]
    epochs = sum(b - a for a, b in zip(at('before_epoch'), at('after_epoch')))
    return dict(total=t1 - t0, ship=ship[-1], to_fit=at('before_fit')[0] - t0, epochs=epochs, n_epochs=len(at('after_epoch')),
                fit_end_to_return=t1 - at('after_fit')[-1], apply=apply[-1])

def main(kind: str, size: int, rounds: int, epochs: int = 1) -> dict:
    learn = make_learner(size) if kind == 'tabular' else make_jpeg_learner(size)
    if kind == 'tabular': local_run, ddp_run = (lambda: learn.fit(epochs)), (lambda cbs: learn.ddp(nprocs=2).fit(epochs, cbs=cbs))
    else: local_run, ddp_run = (lambda: learn.fine_tune(2)), (lambda cbs: learn.ddp(nprocs=2).fine_tune(2, cbs=cbs))
    ship, apply = [], []
    timed(launch_module, 'dumps', ship)
    timed(learner_module, 'apply_result', apply)
    path = tempfile.mktemp(prefix='mpify-bench-stamps-')
    first = one_ddp(ddp_run, path, ship, apply)   # starts the warm server, as a session's first call does
    local, ddp = [], []
    for _ in range(rounds):
        t = time.time(); local_run(); local.append(time.time() - t)
        ddp.append(one_ddp(ddp_run, path, ship, apply))
    os.remove(path)
    return dict(kind=kind, size=size, epochs=epochs, first=first, local=local, ddp=ddp, loadavg=os.getloadavg())

def table(r: dict) -> str:
    med = lambda k: statistics.median(d[k] for d in r['ddp'])
    loc = statistics.median(r['local'])
    rows = [('local', loc), ('DDP, 2 processes', med('total')),
            ('  of which: the caller serializes the Learner', med('ship')),
            ('  the call to rank 0\'s first `before_fit` (ship, fork, load, group, DDP, sharding)', med('to_fit')),
            (f"  rank 0's {r['ddp'][0]['n_epochs']} epoch(s)", med('epochs')),
            ('  rank 0\'s last `after_fit` to the call returning', med('fit_end_to_return')),
            ('  of which: the result applied to the Learner', med('apply'))]
    what = f"{r['size']:,} rows, fit({r['epochs']})" if r['kind'] == 'tabular' else f"{r['size']:,} JPEG files, fine_tune(2)"
    out = [f"{what}, medians of {len(r['ddp'])} alternating rounds, 1-min load {r['loadavg'][0]:.1f}",
           '', '| phase | seconds | / local |', '|---|---|---|']
    out += [f'| {name} | {v:.2f} | {v / loc:.2f}x |' for name, v in rows]
    return '\n'.join(out)

if __name__ == '__main__':
    kind = sys.argv[1] if len(sys.argv) > 1 else 'tabular'
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 2_000_000 if kind == 'tabular' else 1_600
    res = main(kind, size, int(sys.argv[3]) if len(sys.argv) > 3 else 2, int(sys.argv[4]) if len(sys.argv) > 4 else 1)
    print(table(res)); print(json.dumps(res))
