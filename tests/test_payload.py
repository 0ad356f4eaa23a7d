"""The payload between real processes: what a worker receives is its own copy-on-write view of one physical copy, what
it returns costs its own bytes only, nothing is left in /dev/shm, and what cannot be sent is named before any worker
starts. Functions are defined in `__main__`, as in a notebook; nothing is mocked."""
import os, time
import numpy as np
import pandas as pd
import pytest
import torch
import helpers
from mpify_fastai import PayloadError, ranch
from mpify_fastai.serialize import SHARE_MIN_BYTES

pytestmark = pytest.mark.usefixtures('no_leftovers')   # no worker, scratch folder or segment file outlives a call

def shm_mapped() -> int:
    "Bytes of /dev/shm files (deleted ones included) that this process maps: the shared memory it holds."
    total = 0
    with open('/proc/self/maps') as f:
        for line in f:
            parts = line.split()
            if len(parts) > 5 and parts[5].startswith(helpers.SHM + '/'):
                lo, hi = (int(x, 16) for x in parts[0].split('-'))
                total += hi - lo
    return total

CELL = '''
import warnings
def writes(a, t, df):
    "Check what arrived, then write to all of it."
    seen = (a.flags.writeable, float(a.sum()), float(t.sum()), float(df['x'].sum()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.from_numpy(a)
    a += 1; t += 1; df['x'] += 1
    return seen, [str(w.message) for w in caught], float(a.sum())
import torch
'''

def test_worker_writes_never_reach_the_caller(main_ns):
    "Received arrays, tensors and frames are writable, warn about nothing, and each worker's writes stay its own."
    ns = main_ns(CELL)
    a, t = np.zeros(1_000_000), torch.zeros(100_000)
    df = pd.DataFrame({'x': np.zeros(50_000), 'y': np.arange(50_000)})
    res = ranch(2, ns['writes'], a, t, df)
    for seen, warned, after in res:
        assert seen == (True, 0.0, 0.0, 0.0) and warned == [] and after == 1_000_000.0
    assert a.sum() == 0 and t.sum() == 0 and df['x'].sum() == 0

def test_a_result_holds_its_own_bytes_only(main_ns):
    "A returned tensor that views a received buffer brings its own bytes home, not the whole payload."
    ns = main_ns('pick = lambda a, b: b\nhead = lambda a: a[:10]\n')
    big, small = torch.zeros(5_000_000), torch.ones(20_000)     # 20 MB, 80 KB
    held = shm_mapped()
    r = ranch(2, ns['pick'], big, small)
    assert [x.untyped_storage().nbytes() for x in r] == [small.untyped_storage().nbytes()] * 2
    assert torch.equal(r[0], small) and shm_mapped() - held < 2 * SHARE_MIN_BYTES + 2 * small.untyped_storage().nbytes()
    h = ranch(1, ns['head'], big, gather=0)
    assert h.untyped_storage().nbytes() == 40 and h.sum() == 0
    del r, h
    assert shm_mapped() == held

def test_large_results_come_home(main_ns):
    "A numpy array, a DataFrame and a state_dict come back equal and writable; dropping them frees their memory."
    ns = main_ns('''
def make(n):
    import numpy as np, pandas as pd, torch
    return np.arange(n, dtype=np.float32), pd.DataFrame({'a': np.arange(n), 'b': np.ones(n)}), torch.nn.Linear(n // 1000, 300).state_dict()
''')
    held = shm_mapped()
    arr, df, sd = ranch(1, ns['make'], 2_000_000, gather=0)
    assert np.array_equal(arr, np.arange(2_000_000, dtype=np.float32)) and arr.flags.writeable
    assert df['a'].sum() == 2_000_000 * 1_999_999 // 2 and sd['weight'].shape == (300, 2000)
    assert shm_mapped() - held > arr.nbytes      # mapped from the worker's segment file, not copied again
    del arr, df, sd
    assert shm_mapped() == held

def test_failed_call_leaves_nothing_behind(main_ns):
    "A worker failing after it received a large payload: the error comes home, and no scratch file or mapping stays."
    ns = main_ns('def fail(a):\n    raise ValueError(f"got {a.shape}")\n')
    held = shm_mapped()
    with pytest.raises(Exception, match=r'got \(4000000,\)'):
        ranch(2, ns['fail'], np.zeros(4_000_000))
    assert shm_mapped() == held

def test_open_file_is_refused_before_any_worker_starts(main_ns, tmp_path):
    "dill reopened a file in its mode ('w' truncated the user's file in every worker): it is refused, by its path."
    ns = main_ns('def log(sink, line):\n    sink.f.write(line)\n')
    path = tmp_path / 'log.txt'
    with open(path, 'w') as f:
        f.write('header\n'); f.flush()
        sink = type('Sink', (), {})()
        sink.f = f
        with pytest.raises(PayloadError, match=r'cannot send sink\.f: <TextIOWrapper>'):
            ranch(2, ns['log'], sink, 'line\n')
    assert path.read_text() == 'header\n'

def test_payload_error_names_the_culprit_from_what_was_passed(main_ns):
    """A callback holding a generator: the error names the shortest path from the Learner (not an internal argument
    position, not a loop through the callbacks' back-references to the Learner), at once, and nothing starts."""
    import fastai_helpers as fh
    ns = main_ns('''
from fastai.callback.core import Callback
class Streaming(Callback):
    def __init__(self): self.gen = (i for i in range(3))
''')
    learn = fh.sgd_learner(fh.digits_dls_plain(256, 64, bs=64), fh.mlp(), cbs=ns['Streaming']())
    kids = helpers.children_of()
    t = time.perf_counter()
    with pytest.raises(PayloadError) as ei:
        learn.fit_ddp(1, nprocs=2)
    took = time.perf_counter() - t
    msg = str(ei.value)
    assert 'cannot send learn.streaming.gen: <generator>' in msg, msg    # fastai also sets each callback as an attribute
    assert took < 0.5, f"{took:.2f} s to name it"
    assert [c['pid'] for c in helpers.children_of()] == [c['pid'] for c in kids]

@pytest.mark.slow
@pytest.mark.timeout(60)
def test_repeated_fit_ddp_holds_flat_memory_and_saves_like_a_local_fit(tmp_path):
    """The optimizer state that comes home is its own bytes: /dev/shm held by the notebook stays flat over repeated
    `fit_ddp` calls, and `learn.save(with_opt=True)` is the size a local fit gives (it held the whole dataset before)."""
    from torch import nn
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    torch.manual_seed(0)
    X, y = torch.randn(4_000, 640), torch.randint(0, 10, (4_000,))   # 10 MB of samples, as per-sample views
    def learner():
        ds = list(zip(X, y))
        torch.manual_seed(0)   # parameters (and Adam's state) of 160 KB: large enough to travel through the segment file
        model = nn.Sequential(nn.Linear(640, 64), nn.ReLU(), nn.Linear(64, 10))
        return Learner(DataLoaders.from_dsets(ds[400:], ds[:400], bs=512), model, loss_func=CrossEntropyLossFlat())
    learn = learner()
    held = []
    for _ in range(3):
        learn.fit_ddp(1, nprocs=2, progress=False)
        held.append(shm_mapped())
    assert max(held) - min(held) < SHARE_MIN_BYTES and held[-1] < X.nbytes / 4, held
    local = learner()
    with local.no_bar(), local.no_logging(): local.fit(1)
    sizes = [os.path.getsize(l.save(tmp_path / name, with_opt=True)) for l, name in ((learn, 'ddp'), (local, 'local'))]
    assert abs(sizes[0] - sizes[1]) < 0.02 * sizes[1], sizes
