"""fastai applications for `test_applications.py`: small synthetic data for text, vision, segmentation, tabular and
collab Learners, and the callbacks, models and worker functions the DDP workers import by name (tests/ is on sys.path
in the caller and in every worker). Application modules are imported inside the functions, so a worker that only needs
a callback does not pay for importing them all.
"""
from __future__ import annotations
import json, os, random
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from fastai.callback.core import Callback
from fastai.data.load import DataLoader
from fastai.data.core import TfmdDL
from fastai.torch_core import find_bs

def rank() -> int: return int(os.environ.get('RANK', 0))

# ---------------------------------------------------------------- text

_POS = 'good great fine nice happy love wonderful best superb lovely'.split()
_NEG = 'bad awful poor sad hate terrible worst ugly boring dull'.split()
_FILL = 'the a movie film was is it this and plot actor story very quite'.split()

def sentences_df(n: int = 240, seed: int = 0) -> pd.DataFrame:
    "`n` sentences of 4-30 words, label 'pos' or 'neg' (alternating), each with its class's words among common fillers."
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pos = i % 2 == 0
        words = [rng.choice(_POS if pos else _NEG) if rng.random() < 0.35 else rng.choice(_FILL) for _ in range(rng.randint(4, 30))]
        rows.append((' '.join(words), 'pos' if pos else 'neg'))
    return pd.DataFrame(rows, columns=['text', 'label'])

def awd_config(lm: bool) -> dict:
    "A tiny AWD_LSTM: trains in seconds."
    from fastai.text.models.awdlstm import awd_lstm_clas_config, awd_lstm_lm_config
    return dict(awd_lstm_lm_config if lm else awd_lstm_clas_config, emb_sz=32, n_hid=64, n_layers=1)

# ---------------------------------------------------------------- vision

def write_digits(folder: Path, n_per_class: int = 20, classes: int = 4) -> Path:
    "scikit-learn digits of the first `classes` classes as 8x8 grey PNGs in `folder/<class>/`."
    from PIL import Image
    from sklearn.datasets import load_digits
    d = load_digits()
    for c in range(classes):
        Path(folder, str(c)).mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(np.where(d.target == c)[0][:n_per_class]):
            Image.fromarray((d.images[i] * 15.9).astype(np.uint8), mode='L').save(Path(folder, str(c), f'{i}.png'))
    return Path(folder)

def write_rectangles(folder: Path, n: int = 48, size: int = 32, seed: int = 0) -> Path:
    "`n` noisy RGB images with a bright rectangle in `folder/images/`, and its 0/1 mask of the same name in `folder/masks/`."
    from PIL import Image
    rng = np.random.default_rng(seed)
    (folder / 'images').mkdir(parents=True, exist_ok=True)
    (folder / 'masks').mkdir(parents=True, exist_ok=True)
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        y0, x0 = rng.integers(0, size // 2, 2)
        h, w = rng.integers(size // 4, size // 2, 2)
        mask[y0:y0 + h, x0:x0 + w] = 1
        img = rng.integers(0, 90, (size, size, 3)).astype(np.uint8) + mask[..., None] * 150
        Image.fromarray(img).save(folder / 'images' / f'{i}.png')
        Image.fromarray(mask).save(folder / 'masks' / f'{i}.png')
    return folder

def mask_of(fn: Path) -> Path:
    "The label function of `write_rectangles`' images (a module function, so an exported Learner loads anywhere)."
    return Path(fn).parent.parent / 'masks' / Path(fn).name

# ---------------------------------------------------------------- tabular and collab

def tabular_df(n: int = 600, seed: int = 0) -> pd.DataFrame:
    "Two categoricals (one with missing values), two continuous columns (one with NaNs) and a continuous target `y`."
    rng = np.random.default_rng(seed)
    a = rng.choice(['red', 'green', 'blue', 'gold'], n)
    b = rng.choice(['s', 'm', 'l', None], n, p=[0.3, 0.3, 0.3, 0.1])
    x1, x2 = rng.normal(size=n), rng.normal(2, 3, size=n)
    y = 2 * x1 - 0.3 * x2 + pd.Series(a).map({'red': 1, 'green': -1, 'blue': 0.5, 'gold': 0}).values + rng.normal(0, 0.1, n)
    x1[rng.random(n) < 0.1] = np.nan
    return pd.DataFrame(dict(a=a, b=b, x1=x1, x2=x2, y=y.astype(np.float32)))

def ratings_df(n_users: int = 40, n_items: int = 30, n: int = 900, seed: int = 0) -> pd.DataFrame:
    "Ratings 0.5-5 from users' and items' hidden tastes, one row per (user, item) pair, in random order."
    rng = np.random.default_rng(seed)
    u, it = rng.normal(size=(n_users, 3)), rng.normal(size=(n_items, 3))
    pairs = rng.permutation(n_users * n_items)[:n]
    users, items = pairs // n_items, pairs % n_items
    r = np.clip(2.75 + (u[users] * it[items]).sum(1) + rng.normal(0, 0.2, n), 0.5, 5)
    return pd.DataFrame(dict(user=[f'u{x}' for x in users], item=[f'i{x}' for x in items], rating=r.astype(np.float32)))

# ---------------------------------------------------------------- models

class UnusedBranch(nn.Module):
    "A digits classifier with a layer its forward never uses: DDP must be told (`find_unused_parameters=True`)."
    def __init__(self):
        super().__init__()
        self.body, self.unused = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), nn.Linear(64, 10)
    def forward(self, x): return self.body(x)

# ---------------------------------------------------------------- callbacks the workers run

class Rank0Lines(Callback):
    "A user's logger marked `rank0_only`: appends 'rank epoch' to `path` at every epoch end."
    rank0_only = True
    order = 70
    def __init__(self, path): self.path = str(path)
    def after_epoch(self):
        with open(self.path, 'a') as f: f.write(f'{rank()} {self.epoch}\n')

class RecordDrawn(Callback):
    """Each rank writes `folder/drawn<R>.json`: per loader ('train', 'valid') and epoch, the indices its (sharded)
    loader drew, and the items it trained on. Runs after `DistributedRunner` has sharded the loaders."""
    order = 12
    def __init__(self, folder): self.folder = str(folder)
    def before_fit(self):
        self.drawn, self.items = {'train': [], 'valid': []}, []
        for name, dl in (('train', self.dls.train), ('valid', self.dls.valid)):
            def get_idxs(dl=dl, f=dl.get_idxs, out=self.drawn[name]):
                idxs = [int(i) for i in f()]
                out.append(idxs)
                return idxs
            dl.get_idxs = get_idxs
    def before_epoch(self): self.items.append(0)
    def after_batch(self):
        if self.training: self.items[-1] += find_bs(self.yb)
    def after_fit(self):
        Path(self.folder, f'drawn{rank()}.json').write_text(json.dumps(dict(self.drawn, items=self.items)))

# ---------------------------------------------------------------- loaders of users' own, and a worker that shards them

def tag_draws(i):
    "An item transform: the item's id with one draw each of Python's and torch's global RNGs (its augmentation randomness)."
    return torch.tensor(int(i)), torch.tensor(random.random(), dtype=torch.float64), torch.rand(())

class GlobalShuffleDL(TfmdDL):
    "A user's DataLoader whose `shuffle_fn` shuffles with numpy's global RNG."
    def shuffle_fn(self, idxs): return list(np.random.permutation(idxs))

class OwnIdxsDL(TfmdDL):
    "A user's DataLoader whose `get_idxs` draws a random half of the items twice each, with Python's global RNG."
    def get_idxs(self):
        half = random.sample(range(self.n), self.n // 2)
        return half + random.sample(half, len(half))

def shard_epochs(dl, world: int, pad: bool, seed: int, epochs: int = 2, rank_: int | None = None, rng_seed: int | None = None) -> dict:
    """Shard `dl` for this rank (`RANK`, or `rank_`) with `mpify_fastai.distributed.shard_dl` as DistributedRunner does
    (a training loader `pad`ded, a validation loader by whole batches), after putting the global RNGs in this rank's
    own state (seeded `rng_seed`, by default 1000 + rank), and iterate it `epochs` times. Returns
    the indices drawn and the batches (CPU tensors) per epoch, `len(dl)` while sharded, and the global RNGs' next draws."""
    from mpify_fastai.sharding import shard_dl, unshard_dl
    r = rank() if rank_ is None else rank_
    s = 1000 + r if rng_seed is None else rng_seed
    random.seed(s); np.random.seed(s); torch.manual_seed(s)
    saved = shard_dl(dl, r, world, pad, seed, by_batch=not pad)
    drawn, sizes, batches, n_batches = [], [], [], len(dl)
    inner = dl.get_idxs
    def get_idxs():
        idxs = [int(i) for i in inner()]
        drawn.append(idxs)
        return idxs
    dl.get_idxs = get_idxs
    try:
        for _ in range(epochs):
            bs = [tuple(t.as_subclass(torch.Tensor).cpu().clone() for t in (b if isinstance(b, (tuple, list)) else (b,))) for b in dl]
            sizes.append([find_bs(b) for b in bs])
            batches.append(bs)
    finally: unshard_dl(dl, saved)
    return dict(rank=r, drawn=drawn, sizes=sizes, batches=batches, len=n_batches,
                next_draws=(random.random(), float(np.random.rand()), float(torch.rand(()))))

def shard_kinds(loaders: dict, world: int, seed: int, epochs: int = 2) -> dict:
    "`shard_epochs` for every loader in `loaders` (name -> (dl, pad)), in this worker: name -> result."
    return {k: shard_epochs(dl, world, pad, seed + i, epochs) for i, (k, (dl, pad)) in enumerate(loaders.items())}

class RecordRNG(Callback):
    "Each rank writes `folder/rng<R>.json` at `before_fit` (after DistributedRunner) and `before_epoch`: one draw of Python's, numpy's and torch's global RNGs."
    order = 12
    def __init__(self, folder): self.folder,self.draws = str(folder),[]
    def _draw(self): self.draws.append([random.random(), float(np.random.rand()), float(torch.rand(()))])
    def before_fit(self): self.draws = []; self._draw()
    def before_epoch(self): self._draw()
    def after_fit(self): Path(self.folder, f'rng{rank()}.json').write_text(json.dumps(self.draws))

class RecordMix(Callback):
    "Each rank writes `folder/mix<R>.json`: the mean MixUp/CutMix `lam` of each training batch (its own random draws)."
    order = 80
    def __init__(self, folder): self.folder = str(folder)
    def before_fit(self): self.lams = []
    def after_loss(self):
        mixer = getattr(self.learn, 'mix_up', None) or getattr(self.learn, 'cut_mix', None)
        if self.training: self.lams.append(float(torch.as_tensor(mixer.lam).float().mean()))
    def after_fit(self): Path(self.folder, f'mix{rank()}.json').write_text(json.dumps(self.lams))

# ---------------------------------------------------------------- factories (built in each worker)

def text_classifier_factory():
    "A text classifier whose data is built (tokenized in a pool of processes) where it is called."
    from fastai.text.all import AWD_LSTM, TextDataLoaders, accuracy, text_classifier_learner
    dls = TextDataLoaders.from_df(sentences_df(160), text_col='text', label_col='label', valid_pct=0.2, bs=32, seq_len=16,
                                  seed=0, num_workers=2)
    torch.manual_seed(0)
    return text_classifier_learner(dls, AWD_LSTM, pretrained=False, config=awd_config(False), metrics=accuracy)
