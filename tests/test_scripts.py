"""Batch scripts: `ranch` and `fit_ddp` work with or without the `if __name__ == "__main__":` guard, and a script's top level\nruns once, in the caller: workers never re-run it (its code travels by value, as a notebook's)."""
import subprocess, sys, textwrap
import pytest
import helpers

pytestmark = pytest.mark.usefixtures('no_leftovers')

WORKER = '''
import os, sys
from mpify_fastai import ranch

OFFSET = 100

def work(x):
    r = int(os.environ['RANK'])
    print(f'hello from rank {r}')
    print(f'note from rank {r}', file=sys.stderr)
    return x + r + OFFSET
'''

def _write(tmp_path, body: str):
    path = tmp_path / 'job.py'
    path.write_text(textwrap.dedent(body))
    return path

def _kw(method): return '' if method == 'default' else f', start_method={method!r}'

@pytest.mark.parametrize('method', ['default', 'spawn', 'forkserver'])
def test_guarded_script_works(tmp_path, method):
    path = _write(tmp_path, WORKER + f'''
if __name__ == "__main__":
    print('result', ranch(2, work, 1{_kw(method)}))
''')
    r = helpers.run_script(path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ['hello from rank 0', 'result [101, 102]']   # rank 0's prints only
    assert sorted(r.stderr.splitlines()) == ['[rank 1] note from rank 1', 'note from rank 0']
    assert helpers.scratch_of(r.pid) == []

@pytest.mark.parametrize('method', ['default', 'spawn'])
def test_script_read_from_stdin_works(tmp_path, method):
    "`python - < job.py`: __main__.__file__ is '<stdin>', no file a worker could run; it is left out, as for a notebook."
    script = textwrap.dedent(WORKER + f"""
import torch
if __name__ == "__main__":
    print('result', ranch(2, work, 1{_kw(method)}), ranch(2, work, torch.ones(1){_kw(method)}))
""")
    r = subprocess.run([sys.executable, '-'], input=script, capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=helpers.subprocess_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == 'result [101, 102] [tensor([101.]), tensor([102.])]'

def test_guarded_script_worker_error_is_short_and_clear(tmp_path):
    path = _write(tmp_path, WORKER + '''
def bad(x):
    if os.environ['RANK'] == '1': raise KeyError(x)
    return x
if __name__ == "__main__":
    ranch(2, bad, 'missing-key')
''')
    r = helpers.run_script(path)
    assert r.returncode == 1 and helpers.scratch_of(r.pid) == []
    assert "mpify_fastai.errors.WorkerError: rank 1 raised KeyError: 'missing-key'" in r.stderr
    assert '--- traceback from rank 1 ---' in r.stderr and 'in bad' in r.stderr

TRAINS = """
import os, sys, torch
from torch import nn
from fastai.basics import Learner, DataLoaders, TfmdDL, accuracy
from mpify_fastai import ranch

with open(sys.argv[1], 'a') as f: f.write(f'top level ran in {os.getpid()}\\n')   # a side effect at the top level

class Net(nn.Module):                         # a class defined in the script: it travels by value, as a notebook's
    def __init__(self): super().__init__(); self.lin = nn.Linear(4, 2)
    def forward(self, x): return self.lin(x)

def rank_times(k): return int(os.environ['RANK']) * k

def main():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 4, generator=g); y = (X[:, 0] > 0).long()
    dsets = list(zip(X[:48], y[:48])), list(zip(X[48:], y[48:]))
    for method in ('warm', 'spawn', 'forkserver', 'fork'):
        learn = Learner(DataLoaders.from_dsets(*dsets, bs=16), Net(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
        learn.fit_ddp(1, 0.1, nprocs=2, start_method=method, progress=False)
        print(method, ranch(2, rank_times, 10, start_method=method), len(learn.recorder.values), flush=True)
"""

@pytest.mark.parametrize('guarded', [False, True], ids=['unguarded', 'guarded'])
def test_script_top_level_runs_once(tmp_path, guarded):
    "A script's top level runs once, in the caller, under every start method, with or without the main guard."
    path = _write(tmp_path, TRAINS + ('if __name__ == "__main__": main()\n' if guarded else 'main()\n'))
    marker = tmp_path / 'ran.txt'
    r = helpers.run_script(path, marker, timeout=240)
    assert r.returncode == 0, r.stderr
    assert [l.split()[0] for l in r.stdout.splitlines()] == ['warm', 'spawn', 'forkserver', 'fork'], r.stdout
    assert all(l.endswith('[0, 10] 1') for l in r.stdout.splitlines()), r.stdout   # every launch ran, one epoch recorded
    assert marker.read_text().splitlines() == [f'top level ran in {r.pid}']
    assert helpers.scratch_of(r.pid) == []
