"""Bugs the fault campaign (tests/soak/test_faults.py) found, each pinned by a small real case: an interrupt while a result
is applied leaves it whole, and torch's /dev/shm file that a failed worker's DataLoader leaves (a full /dev/shm) goes with the call."""
from __future__ import annotations
import os, signal, subprocess, sys
import pytest
import helpers

def _learners():
    "Two small Learners on the same data: `done` has trained one epoch locally, `learn` not at all."
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.losses import MSELossFlat
    X = torch.randn(64, 4)
    dls = DataLoaders.from_dsets(TensorDataset(X, X.sum(1, keepdim=True)), TensorDataset(X[:16], X[:16].sum(1, keepdim=True)),
                                 bs=16, num_workers=0)
    make = lambda: Learner(dls, nn.Linear(4, 1), loss_func=MSELossFlat())
    done = make()
    with done.no_bar(), done.no_logging(): done.fit(1)
    return make(), done

def test_interrupt_while_the_result_is_applied_leaves_it_whole():
    "A SIGINT that lands while the weights load (a real signal, sent by a load hook) is raised after the history and optimizer are in too."
    learn, done = _learners()   # fastai first: mpify_fastai.state imported before fastai.learner trips the import hook
    from mpify_fastai.state import apply_result, learner_result
    res = learner_result(done)
    learn.model.register_load_state_dict_post_hook(lambda module, keys: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(KeyboardInterrupt): apply_result(learn, res)
    assert all((learn.model.state_dict()[k] == v).all() for k, v in res['state_dict'].items())
    assert learn.recorder.values == res['recorder']['values'] and len(learn.recorder.losses) == len(res['recorder']['losses']) == 4
    assert learn.opt is not None and learn.epoch == res['epoch']
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

FAIL_IN_LOADER = '''
import os, sys, time, torch
from pathlib import Path
from torch.utils.data import DataLoader
from mpify_fastai import ranch
def fail_in_loader(folder):
    "Rank 1's DataLoader worker cannot fill its batch's /dev/shm file (torch leaves the file) and stays; then rank 0 fails."
    if os.environ['RANK'] == '1':
        it = iter(DataLoader(torch.zeros(2, 4_000_000), batch_size=1, num_workers=1))   # 16 MB batches, 8 MB /dev/shm
        try: next(it)
        except RuntimeError as e: print('LOADER', str(e).splitlines()[-1], file=sys.stderr, flush=True)
        Path(folder, 'failed').write_text('')
        time.sleep(60)
    while not Path(folder, 'failed').exists(): time.sleep(0.05)
    raise ValueError('rank 0 fails')
if __name__ == "__main__":
    try: ranch(2, fail_in_loader, sys.argv[1])
    except Exception as e: print("ERR", type(e).__name__, str(e).splitlines()[0], flush=True)
'''

def test_torch_shm_file_of_a_failed_worker_is_removed(tmp_path):
    """torch leaves `/dev/shm/torch_<pid>_*` when a DataLoader worker cannot fill it (a full /dev/shm: a private 8 MB
    tmpfs); the failed call removes it, once the stopped worker's DataLoader worker is gone."""
    if subprocess.run(['unshare', '-m', 'true'], capture_output=True).returncode != 0:
        pytest.skip('unshare -m is not permitted here (needs root or user namespaces)')
    script = tmp_path / 'fail_in_loader.py'
    script.write_text(FAIL_IN_LOADER)
    r = subprocess.run(['unshare', '-m', 'sh', '-c', f'mount -t tmpfs -o size=8m tmpfs /dev/shm && {sys.executable} {script} {tmp_path}; '
                        'echo "LEFT $(ls -A /dev/shm)"'], capture_output=True, text=True, timeout=120,
                       env=helpers.subprocess_env(MPIFY_PREWARM=0))
    assert 'No space left on device' in r.stderr and 'ERR WorkerError rank 0 raised ValueError' in r.stdout, r.stdout + r.stderr[-3000:]
    assert r.stdout.rstrip().endswith('LEFT'), r.stdout
