"""`fit_ddp` from a real Jupyter kernel (nbclient): fastai's real data pipelines built in the notebook, and the
progress display drawn in the notebook.

One notebook, executed once for this module (a kernel that imports fastai costs ~10 s, each fit_ddp 15-40 s):
a vision DataBlock over PNG files in class folders with a notebook function `get_y`, a tabular learner over a DataFrame, a
collaborative-filtering learner over synthetic ratings, and a 3-epoch digits fit whose displayed table is checked.
Each pipeline trains with `fit_ddp(2, nprocs=2)`, then reads its history, validates, predicts and exports in the
notebook; a summary cell prints one `RESULT {json}` line the tests read.
"""
from __future__ import annotations
import json, re
from html.parser import HTMLParser
from pathlib import Path

import pytest

import helpers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]   # the first test also runs the whole notebook

SETUP = '''
import json, os, warnings
from pathlib import Path
import numpy as np, pandas as pd, torch
from torch import nn
from fastai.vision.all import *
from fastai.tabular.all import *
from fastai.collab import *
import mpify_fastai                      # adds Learner.fit_ddp
work = Path(os.getcwd())

def summary(learn, item, fname, predict=lambda l, x: l.predict(x)[-1]):
    """What a user reads after training: history, validate, predict, export and reload (history first: validate
    changes it). `predict` returns the prediction's probabilities (or values) as a tensor."""
    hist = [[float(v) for v in r] for r in learn.recorder.values]
    names = list(learn.recorder.metric_names)
    val = [float(v) for v in learn.validate()]
    probs = predict(learn, item).flatten().tolist()
    learn.export(fname)
    again = predict(load_learner(learn.path/fname), item).flatten().tolist()
    print('RESULT ' + json.dumps(dict(hist=hist, names=names, val=val, probs=probs, probs_again=again,
                                      exported=str((learn.path/fname).resolve()))))
'''

VISION_DATA = '''
from PIL import Image
from sklearn.datasets import load_digits
d = load_digits()
img_dir = work/'digits_png'
for i in range(480):
    folder = img_dir/str(d.target[i]); folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray((d.images[i] * 255 / 16).astype('uint8')).save(folder/f'{i}.png')
def label_of(p): return p.parent.name   # a notebook function (fastai 2.7's export pickles no lambda, even locally)
dblock = DataBlock(blocks=(ImageBlock(cls=PILImageBW), CategoryBlock), get_items=get_image_files,
                   splitter=RandomSplitter(0.25, seed=42), get_y=label_of)
vdls = dblock.dataloaders(img_dir, bs=32)
torch.manual_seed(0)
vmodel = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
vlearn = Learner(vdls, vmodel, loss_func=CrossEntropyLossFlat(), metrics=accuracy)
print(len(vdls.train_ds), len(vdls.valid_ds), list(vdls.vocab))
'''
VISION_FIT = 'vlearn.fit_ddp(2, 3e-3, nprocs=2)'
VISION_SUMMARY = "summary(vlearn, img_dir/'0'/'0.png', 'vision.pkl')"

TABULAR_DATA = '''
from sklearn.datasets import load_wine
w = load_wine(as_frame=True)
tdf = w.frame.copy()
tdf['target'] = [str(w.target_names[i]) for i in w.target]
tdf['alc_band'] = pd.cut(tdf['alcohol'], 3, labels=['low', 'mid', 'high']).astype(str)
conts = [c for c in w.feature_names if c != 'alcohol']
tdls = TabularDataLoaders.from_df(tdf, path=work, procs=[Categorify, FillMissing, Normalize], cat_names=['alc_band'],
                                  cont_names=conts, y_names='target', valid_idx=list(range(0, len(tdf), 4)), bs=32)
torch.manual_seed(0)
tlearn = tabular_learner(tdls, layers=[32, 16], metrics=accuracy)
'''
TABULAR_FIT = 'tlearn.fit_ddp(2, 1e-2, nprocs=2)'
TABULAR_SUMMARY = "summary(tlearn, tdf.iloc[0], 'tabular.pkl')"

COLLAB_DATA = '''
rng = np.random.default_rng(0)
n_u, n_i, n = 60, 40, 1500
uf, itf = rng.normal(size=(n_u, 4)), rng.normal(size=(n_i, 4))
u, i = rng.integers(0, n_u, n), rng.integers(0, n_i, n)
r = np.clip(np.round(3 + 0.7 * (uf[u] * itf[i]).sum(1) + rng.normal(0, 0.3, n)), 1, 5)
ratings = pd.DataFrame(dict(user=u, item=i, rating=r.astype('float32'))).drop_duplicates(['user', 'item']).reset_index(drop=True)
cdls = CollabDataLoaders.from_df(ratings, valid_pct=0.2, seed=42, bs=64, path=work)
torch.manual_seed(0)
clearn = collab_learner(cdls, n_factors=8, y_range=(0.5, 5.5), metrics=rmse)
'''
COLLAB_FIT = 'clearn.fit_ddp(2, 5e-2, nprocs=2)'
COLLAB_SUMMARY = "summary(clearn, ratings.iloc[:5], 'collab.pkl', lambda l, df: l.get_preds(dl=l.dls.test_dl(df))[0])"

DISPLAY_FIT = '''
from mpify_fastai.demo import digits_cnn, digits_dls
dlearn = Learner(digits_dls(), digits_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
dlearn.fit_ddp(3, 1e-2, nprocs=2)
'''
DISPLAY_SUMMARY = "print('RESULT ' + json.dumps(dict(hist=[[float(v) for v in r] for r in dlearn.recorder.values])))"

CELLS = dict(setup=SETUP, vision_data=VISION_DATA, vision_fit=VISION_FIT, vision_summary=VISION_SUMMARY,
             tabular_data=TABULAR_DATA, tabular_fit=TABULAR_FIT, tabular_summary=TABULAR_SUMMARY,
             collab_data=COLLAB_DATA, collab_fit=COLLAB_FIT, collab_summary=COLLAB_SUMMARY,
             display_fit=DISPLAY_FIT, display_summary=DISPLAY_SUMMARY)

@pytest.fixture(scope='module')
def nb(tmp_path_factory):
    "The executed notebook's cells by name (errors stay in the cells: each test reports its own)."
    work = tmp_path_factory.mktemp('fit_ddp_nb')
    done = helpers.run_notebook(list(CELLS.values()), timeout=300, allow_errors=True, cwd=str(work))
    cells = dict(zip(CELLS, done.cells))
    cells['_work'] = work
    return cells

def _ok(cell) -> None:
    errs = helpers.cell_errors(cell)
    assert not errs, f"cell failed:\n{cell.source}\n" + helpers.strip_ansi('\n'.join('\n'.join(e['traceback']) for e in errs))

def _result(cell) -> dict:
    _ok(cell)
    out = helpers.cell_output(cell, 'stdout')
    lines = [l for l in out.splitlines() if l.startswith('RESULT ')]
    assert len(lines) == 1, out
    return json.loads(lines[0][len('RESULT '):])

class _Tables(HTMLParser):
    "Every <table> in an HTML snippet as a list of rows (header row included), each a list of cell texts."
    def __init__(self):
        super().__init__(); self.tables, self.row, self.cell = [], None, None
    def handle_starttag(self, tag, attrs):
        if tag == 'table': self.tables.append([])
        elif tag == 'tr': self.row = []
        elif tag in ('td', 'th'): self.cell = ''
    def handle_endtag(self, tag):
        if tag in ('td', 'th') and self.row is not None: self.row.append(self.cell.strip()); self.cell = None
        elif tag == 'tr' and self.tables: self.tables[-1].append(self.row); self.row = None
    def handle_data(self, data):
        if self.cell is not None: self.cell += data

def _html_tables(cell) -> list[list[list[str]]]:
    out = []
    for o in cell.get('outputs', []):
        html = o.get('data', {}).get('text/html') if o['output_type'] in ('display_data', 'execute_result') else None
        if html:
            p = _Tables(); p.feed(html if isinstance(html, str) else ''.join(html)); out += p.tables
    return out

def _check_pipeline(nb, name: str, n_metrics: int):
    for part in ('data', 'fit'): _ok(nb[f'{name}_{part}'])
    res = _result(nb[f'{name}_summary'])
    assert len(res['hist']) == 2 and all(len(r) == 2 + n_metrics for r in res['hist']), res
    assert res['names'][:3] == ['epoch', 'train_loss', 'valid_loss'] and res['names'][-1] == 'time'
    assert all(x == x and abs(x) < 1e6 for r in res['hist'] for x in r), f"non-finite history: {res['hist']}"
    assert res['val'] == pytest.approx(res['hist'][-1][1:], abs=1e-4), "validate() differs from the last recorded epoch"
    assert res['probs_again'] == pytest.approx(res['probs'], abs=1e-5), "the exported Learner predicts differently"
    assert Path(res['exported']) == (nb['_work'] / f'{name}.pkl').resolve() and Path(res['exported']).exists()
    tables = _html_tables(nb[f'{name}_fit'])
    assert tables and [r[0] for r in tables[-1][1:]] == ['0', '1'], f"no 2-epoch table shown by the fit cell: {tables}"
    return res

def test_vision_datablock_from_png_folders(nb):
    "DataBlock over PNG files with a notebook function as get_y: trains in DDP, validates, predicts and exports in the notebook."
    out = helpers.cell_output(nb['vision_data'], 'stdout')
    assert out.split('\n')[0].strip() == "360 120 ['0', '1', '2', '3', '4', '5', '6', '7', '8', '9']", out
    res = _check_pipeline(nb, 'vision', 1)
    assert len(res['probs']) == 10 and sum(res['probs']) == pytest.approx(1, abs=1e-4)

def test_tabular_learner(nb):
    res = _check_pipeline(nb, 'tabular', 1)
    assert len(res['probs']) == 3 and sum(res['probs']) == pytest.approx(1, abs=1e-4)
    assert res['hist'][-1][2] > 0.5, "two epochs on wine should beat chance"

def test_collab_learner(nb):
    res = _check_pipeline(nb, 'collab', 1)
    assert res['names'] == ['epoch', 'train_loss', 'valid_loss', '_rmse', 'time']
    assert len(res['probs']) == 5 and all(0.5 <= p <= 5.5 for p in res['probs'])

def test_progress_display_in_notebook(nb):
    """fit_ddp(3, nprocs=2) in a notebook shows fastai's HTML metrics table (header + 3 epoch rows), like a local fit,
    and no console progress bars (no '\\r') anywhere in the notebook's stream output."""
    cell = nb['display_fit']
    _ok(cell)
    tables = _html_tables(cell)
    assert len(tables) == 1, f"expected one metrics table, got {tables}"
    table = tables[0]
    assert table[0] == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'time'], table
    assert [r[0] for r in table[1:]] == ['0', '1', '2'], table
    hist = _result(nb['display_summary'])['hist']
    for row, rec in zip(table[1:], hist):
        assert [float(x) for x in row[1:4]] == pytest.approx(rec, abs=1e-6)
        assert re.fullmatch(r'\d\d:\d\d', row[4])
    html = [o['data']['text/html'] for o in cell['outputs'] if 'text/html' in o.get('data', {})]
    assert sum('<table' in h for h in html) == 1, "the table must be drawn in one display, updated in place"
    for name, c in nb.items():
        if name.startswith('_'): continue
        for o in c.get('outputs', []):
            assert ' object at 0x' not in o.get('data', {}).get('text/html', ''), f"a Python repr in the HTML of {name!r}"
            if o['output_type'] == 'stream':
                assert '\r' not in o['text'], f"progress-bar text in the output of cell {name!r}: {o['text'][:300]!r}"
