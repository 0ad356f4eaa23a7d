"""mpify's calls work here, or fail with a message that says what to write: `ctx=`, `gather=True/False`, `caller_rank`,
`in_torchddp`'s `world_size`/`base_rank`, `global_imports`, and mpify's own fastai example ported (in a real kernel)."""
import json
import pytest
import helpers
from compat_helpers import TeardownProbe, group_facts
from helpers import cell_errors, cell_output, run_notebook, square_rank, touch_rank
from mpify_fastai import TorchDDPCtx, global_imports, in_torchddp, ranch

pytestmark = pytest.mark.usefixtures('no_leftovers')

def _stores() -> set[str]:
    import glob, tempfile
    return set(glob.glob(f'{tempfile.gettempdir()}/mpify-*-store-*'))

@pytest.mark.parametrize('ctx', [TorchDDPCtx(), TorchDDPCtx], ids=['instance', 'class'])
def test_ranch_ctx_torchddpctx_is_in_torchddp(ctx):
    "`ranch(2, f, ctx=TorchDDPCtx())` (or the class): one gloo group through a private file store, loopback only, removed after."
    before = _stores()
    res = ranch(2, group_facts, ctx=ctx)
    assert [(r['initialized'], r['rank'], r['world'], r['sum']) for r in res] == [(True, 0, 2, 3.0), (True, 1, 2, 3.0)]
    assert all(r['backend'] == 'gloo' and r['init'].startswith('file://') and r['ifname'] == 'lo' for r in res)
    same = lambda rs: [{k: v for k, v in r.items() if k != 'init'} for r in rs]   # each launch has its own store
    assert same(res) == same(in_torchddp(2, group_facts))
    assert not _stores() - before   # an earlier test's dead caller may have left one, swept since: only ours matter

def test_ranch_ctx_group_ends_with_its_workers(tmp_path):
    """The group a launch makes is left without torch's teardown (which can hang): it ends with the worker, which exits
    right after `fn`; the next call makes its own. mpify's `num_threads` sets each rank's torch threads."""
    res = ranch(2, group_facts, ctx=TeardownProbe(str(tmp_path), num_threads=1))
    assert [r['threads'] for r in res] == [1, 1]
    assert [(tmp_path / f'after-{r}').read_text() for r in (0, 1)] == ['True', 'True']
    assert [r['sum'] for r in ranch(2, group_facts, ctx=TeardownProbe(str(tmp_path)))] == [3.0, 3.0]

def test_gather_true_and_false(tmp_path):
    "mpify's gather=True is every rank's result; gather=False returns nothing, but every rank still ran."
    assert ranch(3, square_rank, gather=True) == [0, 1, 4]
    assert ranch(2, touch_rank, str(tmp_path), gather=False) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ran-0', 'ran-1']
    assert in_torchddp(2, group_facts, gather=True)[1]['rank'] == 1

def test_caller_rank_none_and_mpify_sizes_accepted():
    "caller_rank=None (the only value) works, and so do in_torchddp's world_size=nprocs and base_rank=0."
    assert ranch(2, square_rank, 1, caller_rank=None) == [1, 2]
    assert [r['world'] for r in in_torchddp(2, group_facts, world_size=2, base_rank=0, caller_rank=None)] == [2, 2]

def test_global_imports_takes_mpify_lines():
    "mpify's `global_imports(list_of_lines, ns)`, and the same text as one string; anything else is refused."
    import json, os.path
    ns = global_imports(['import json', 'from os import path as p'], {})
    assert ns['json'] is json and ns['p'] is os.path
    assert global_imports('import json\nfrom os import path as p', {})['p'] is os.path
    with pytest.raises(ValueError, match='only import statements'): global_imports(['import os', 'x = 1'], {})

NOTEBOOK_CONTEXTS = [
    'from mpify_fastai import ranch, in_torchddp, WorkerError\nimport os, contextlib\nfrom pathlib import Path',
    ('class Tagged:\n'
     '    "A notebook context manager: sets a variable for fn, leaves a file per rank on exit."\n'
     '    def __init__(self, folder, tag): self.folder, self.tag = folder, tag\n'
     '    def __enter__(self):\n'
     '        import torch.distributed as dist\n'
     '        os.environ["TAG"] = self.tag + (":group" if dist.is_initialized() else ":plain")\n'
     '        return self\n'
     '    def __exit__(self, *exc):\n'
     '        Path(self.folder, "exit-" + os.environ["RANK"]).write_text(repr(exc[0]))\n'
     '        return False\n'
     'def tag(): return os.environ["TAG"]'),
    'import tempfile; folder = tempfile.mkdtemp()\nprint(ranch(2, tag, ctx=Tagged(folder, "t")))',
    'print(sorted((p.name, p.read_text()) for p in Path(folder).iterdir()))',
    'print(in_torchddp(2, tag, ctx=Tagged(folder, "g")))',
    ('@contextlib.contextmanager\n'
     'def shouting():\n'
     '    os.environ["TAG"] = "LOUD"\n'
     '    yield\n'
     'print(ranch(2, tag, ctx=shouting))'),
    ('class BadEnter:\n'
     '    def __enter__(self):\n'
     '        if os.environ["RANK"] == "1": raise ValueError("cannot enter on rank 1")\n'
     '        os.environ["TAG"] = "entered"\n'
     '    def __exit__(self, *exc): return False\n'
     'ranch(2, tag, ctx=BadEnter())'),
    ('class BadExit:\n'
     '    def __enter__(self): os.environ["TAG"] = "x"\n'
     '    def __exit__(self, *exc): raise KeyError("cleanup failed")\n'
     'ranch(2, tag, ctx=BadExit())'),
]

def test_notebook_contexts_in_a_real_kernel():
    "A notebook's own context managers around fn: a class, a @contextmanager function, inside in_torchddp's group; a raise in __enter__ or __exit__ is reported like fn's."
    nb = run_notebook(NOTEBOOK_CONTEXTS, timeout=120, allow_errors=True)
    out = [cell_output(c) for c in nb.cells]
    assert not any(cell_errors(c) for c in nb.cells[:6]), out
    assert "['t:plain', 't:plain']" in out[2]
    assert "[('exit-0', 'None'), ('exit-1', 'None')]" in out[3]
    assert "['g:group', 'g:group']" in out[4]                    # entered inside the group
    assert "['LOUD', 'LOUD']" in out[5]
    enter, exit_ = cell_errors(nb.cells[6]), cell_errors(nb.cells[7])
    assert enter[0]['ename'] == 'WorkerError' and 'rank 1 raised ValueError: cannot enter on rank 1' in out[6]
    assert '__enter__' in out[6]                                 # the remote traceback shows where
    assert exit_[0]['ename'] == 'WorkerError' and "raised KeyError: 'cleanup failed'" in out[7] and '__exit__' in out[7]

def _ported_blocks() -> list[str]:
    "The ported mpify example in 01_ranch's 'Coming from mpify': its two code blocks."
    import re
    cells = [''.join(c['source']) for c in json.loads((helpers.REPO / 'nbs' / '01_ranch.ipynb').read_text())['cells']]
    section, = [c for c in cells if c.startswith('## Coming from mpify')]
    return re.findall(r'```python\n(.*?)```', section, re.S)[:2]

# the README's example at a size this CPU trains in seconds: no download, no pretrained weights
_SMALL = {"untar_data(URLs.PETS)/'images'": 'Path(IMAGES)', 'resnet34': 'resnet18', 'Resize(224)': 'Resize(32)',
          'metrics=error_rate)': 'metrics=error_rate, pretrained=False)', 'fine_tune(4)': 'fine_tune(1)',
          'in_torchddp(3,': 'in_torchddp(2,', 'nprocs=3': 'nprocs=2'}

IMAGES = '''
import numpy as np, tempfile
from PIL import Image
from sklearn.datasets import load_digits
IMAGES = tempfile.mkdtemp()
d = load_digits()
for i, (img, y) in enumerate(zip(d.images[:160], d.target[:160])):   # pets-style names: cats start upper-case
    Image.fromarray((img * 16).astype(np.uint8)).convert('RGB').save(f"{IMAGES}/{'Cat' if y >= 5 else 'dog'}_{i}.png")
'''

def test_ported_mpify_example_runs_in_a_real_kernel():
    "01_ranch's port of mpify's `train_cnn` example runs as written (smaller), with in_torchddp and as fit_ddp, on gloo."
    blocks = _ported_blocks()
    for old, new in _SMALL.items():
        assert any(old in b for b in blocks), f"the README example no longer contains {old!r}"
        blocks = [b.replace(old, new) for b in blocks]
    cells = [IMAGES, blocks[0], 'print(type(learn).__name__, [float(v) for v in learn.validate()])',
             blocks[1], 'row = [float(v) for v in learn.recorder.values[-1]][1:]\n'
                        'print(len(learn.recorder.values), all(abs(a - b) < 1e-5 for a, b in zip(row, learn.validate())))']
    nb = run_notebook(cells, timeout=180)
    out = [cell_output(c, 'stdout') for c in nb.cells]
    assert out[2].startswith('Learner [') and len(eval(out[2][len('Learner '):])) == 2, out[2]   # rank 0's trained Learner
    assert out[4].strip() == '1 True', out
