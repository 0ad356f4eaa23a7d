"""Long runs never lose what they trained: an interrupt hands the Learner the last completed epoch (and the schedule
goes on with `start_epoch=`), a dead worker is restarted from it (`max_restarts`), a deterministic bug is not retried,
and a failure's checkpoint applies in one call. Real processes, real signals, a real script for the interrupt."""
import os, signal, subprocess, sys, time
import pytest
import helpers
from fastai.metrics import accuracy
from fastai_helpers import digits_dls_plain, mlp, params_of, sgd_learner, bitwise_equal
from mpify_fastai import WorkerDied, WorkerError
from recovery_helpers import MOMENTS, KillOnce, RaiseEverywhere, StopAt

pytestmark = pytest.mark.usefixtures('no_leftovers')

def _learner(**kw):
    return sgd_learner(digits_dls_plain(256, 128, bs=32, shuffle=True), mlp(), metrics=accuracy, **kw)

def _rows_match_validate(learn, n_epoch):
    rows = [[float(v) for v in r] for r in learn.recorder.values]
    assert len(rows) == n_epoch and all(len(r) == 3 for r in rows)
    with learn.no_bar(): val = [float(v) for v in learn.validate()]
    assert rows[-1][1:] == pytest.approx(val, abs=1e-4)

def test_dead_worker_restarts_from_last_epoch(tmp_path):
    "rank 1 SIGKILLed once at the end of epoch 2, max_restarts=1: the second attempt trains epoch 3 only; each row once, metrics equal validate()."
    learn = _learner()
    learn.ddp(nprocs=2, max_restarts=1).fit_one_cycle(4, 0.1, cbs=[KillOnce(str(tmp_path))])
    _rows_match_validate(learn, 4)
    assert (tmp_path / 'attempts').read_text().split() == ['0', '1']
    assert (tmp_path / 'epochs').read_text().splitlines() == ['0 0', '0 1', '0 2', '1 3']

@pytest.mark.parametrize('moment', MOMENTS)
def test_restart_at_each_moment_resumes_from_the_last_completed_epoch(tmp_path, capsys, moment):
    """rank 1 SIGKILLed once at `moment` of fit_one_cycle(3), max_restarts=1: the second attempt trains only the epochs
    after the last checkpointed one (all of them before the first epoch ended, none once the last one is checkpointed);
    killed after rank 0 saved the result, nothing restarts and that result is the Learner's. Rows once each, = validate()."""
    learn = _learner()
    learn.ddp(nprocs=2, max_restarts=1).fit_one_cycle(3, 0.1, cbs=[StopAt(str(tmp_path), moment)])
    _rows_match_validate(learn, 3)
    epochs = (tmp_path / 'epochs').read_text().splitlines()
    again = {'first_epoch': ['1 0', '1 1', '1 2'], 'last_epoch': ['1 2'], 'last_epoch_end': [], 'result': []}[moment]
    assert epochs == ['0 0', '0 1', '0 2'][:3 if moment != 'first_epoch' else 1] + again, epochs
    out = capsys.readouterr()
    attempts = (tmp_path / 'attempts').read_text().split()
    if moment == 'result':
        assert attempts == ['0'] and 'after rank 0 had written the result: the run is finished, nothing restarts' in out.out + out.err
    else: assert attempts == ['0', '1'] and 'restart 1 of 1, with ' in out.out + out.err

def test_death_without_restarts_keeps_the_checkpoint(tmp_path):
    "Without restarts a death fails the call, the Learner stays as it was, and one call applies the last epoch's checkpoint."
    learn = _learner()
    before = params_of(learn.model)
    with pytest.raises(WorkerDied, match='rank 1 was killed by signal SIGKILL') as ei:
        learn.fit_ddp(4, 0.1, nprocs=2, cbs=[KillOnce(str(tmp_path))])
    assert bitwise_equal(params_of(learn.model), before) and 'values' not in learn.recorder.__dict__
    assert 'learn.load_ddp_result(' in str(ei.value)
    learn.load_ddp_result(ei.value.checkpoint)
    assert len(learn.recorder.values) == 3 and learn.epoch == 2 and learn.opt is not None
    assert not bitwise_equal(params_of(learn.model), before)
    os.remove(ei.value.checkpoint)

def test_user_bug_is_not_retried(tmp_path):
    "A Python error raised on every rank fails at once, with max_restarts=2: one attempt only."
    learn = _learner()
    with pytest.raises(WorkerError, match="a bug in the user's code") as ei:
        learn.ddp(nprocs=2, max_restarts=2).fit(3, 0.1, cbs=[RaiseEverywhere(str(tmp_path))])
    assert (tmp_path / 'attempts').read_text().split() == ['0']
    if getattr(ei.value, 'checkpoint', None): os.remove(ei.value.checkpoint)

def test_bad_max_restarts_refused_before_launch():
    with pytest.raises(ValueError, match='max_restarts must be an int >= 0'): _learner().ddp(nprocs=2, max_restarts=-1).fit(1)

SCRIPT = '''
import json, os, sys, time
sys.path.insert(0, {tests!r})
import mpify_fastai
from fastai.metrics import accuracy
from fastai_helpers import digits_dls_plain, mlp, sgd_learner
from recovery_helpers import SlowEpochs

if __name__ == "__main__":
    folder = sys.argv[1]
    learn = sgd_learner(digits_dls_plain(256, 128, bs=32, shuffle=True), mlp(), metrics=accuracy)
    try:
        learn.ddp(nprocs=2).fit_one_cycle(8, 0.1, cbs=[SlowEpochs(folder)])
    except KeyboardInterrupt:
        print("INTERRUPTED " + json.dumps(dict(t=time.time(), rows=len(learn.recorder.values), epoch=learn.epoch)), flush=True)
    done = len(learn.recorder.values)
    learn.ddp(nprocs=2).fit_one_cycle(8, 0.1, start_epoch=done)
    rows = [[float(v) for v in r] for r in learn.recorder.values]
    with learn.no_bar(): val = [float(v) for v in learn.validate()]
    print("RESUMED " + json.dumps(dict(rows=rows, val=val)), flush=True)
'''

def _start_script(tmp_path, source: str) -> subprocess.Popen:
    "Write `source` (formatted with the tests folder) as a script in tmp_path and start it with tmp_path as its argument."
    script = tmp_path / 'train.py'
    script.write_text(source.format(tests=str(helpers.REPO / 'tests')))
    return subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=helpers.subprocess_env(), cwd=str(tmp_path))

def test_interrupt_keeps_progress_and_start_epoch_goes_on(tmp_path):
    "Ctrl-C after epoch 2: workers stop promptly, the Learner holds the completed epochs with one message saying how to go on; start_epoch= finishes the schedule with every row."
    import json
    p = _start_script(tmp_path, SCRIPT)
    try:
        helpers.wait_for_files([tmp_path / 'done-2'], timeout=120, proc=p)
        sent = time.time()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None: p.kill(); p.communicate()
    assert p.returncode == 0, err[-3000:]
    stopped = json.loads(out.split('INTERRUPTED ')[1].splitlines()[0])
    assert stopped['t'] - sent < 10 and stopped['rows'] >= 3 and stopped['epoch'] == stopped['rows'] - 1
    done = stopped['rows']
    assert f"stopped with {done} of 8 epochs done (epochs 0-{done - 1}); the Learner holds them" in out + err
    assert f"start_epoch={done})" in out + err
    resumed = json.loads(out.split('RESUMED ')[1].splitlines()[0])
    assert len(resumed['rows']) == 8 and all(len(r) == 3 for r in resumed['rows'])
    assert resumed['rows'][-1][1:] == pytest.approx(resumed['val'], abs=1e-4)

RESUME_EXACT = '''
import json, sys
sys.path.insert(0, {tests!r})
import mpify_fastai
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai_helpers import digits_dls_plain, max_abs_diff, mlp, params_of
from recovery_helpers import EpochsTrained, SlowEpochs

def learner():   # Adam (its moments must come back too), fixed data order, no dropout: two runs can agree exactly
    return Learner(digits_dls_plain(256, 128, bs=32), mlp(), loss_func=CrossEntropyLossFlat())

if __name__ == "__main__":
    folder = sys.argv[1]
    learn, whole = learner(), learner()
    try: learn.ddp(nprocs=2).fit_one_cycle(6, 1e-2, cbs=[SlowEpochs(folder), EpochsTrained(folder, 'interrupted')])
    except KeyboardInterrupt: pass
    done = len(learn.recorder.values)
    learn.ddp(nprocs=2).fit_one_cycle(6, 1e-2, start_epoch=done, cbs=EpochsTrained(folder, 'resumed'))
    whole.ddp(nprocs=2).fit_one_cycle(6, 1e-2)
    valid = lambda l: [float(r[1]) for r in l.recorder.values]
    print("RESULT " + json.dumps(dict(done=done, diff=max_abs_diff(params_of(learn.model), params_of(whole.model)),
                                      valid=valid(learn), valid_whole=valid(whole))), flush=True)
'''

def test_interrupted_and_resumed_fit_equals_an_uninterrupted_one(tmp_path):
    "Ctrl-C after epoch 1 of fit_one_cycle(6), then start_epoch=k: epochs k..5 train, once each, and weights and valid losses equal an uninterrupted run's (1e-5)."
    import json
    p = _start_script(tmp_path, RESUME_EXACT)
    try:
        helpers.wait_for_files([tmp_path / 'done-1'], timeout=120, proc=p)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None: p.kill(); p.communicate()
    assert p.returncode == 0, err[-3000:]
    res = json.loads(out.split('RESULT ')[1].splitlines()[0])
    k = res['done']
    interrupted, resumed = ([int(e) for e in (tmp_path / n).read_text().split()] for n in ('interrupted', 'resumed'))
    assert 2 <= k < 6 and interrupted[:k] == list(range(k)) and len(interrupted) <= k + 1, (k, interrupted)
    assert resumed == list(range(k, 6)), (k, resumed)
    assert res['diff'] < 1e-5 and res['valid'] == pytest.approx(res['valid_whole'], abs=1e-5), res

def test_timeout_shows_where_every_rank_was():
    "timeout=5 on a hang: LaunchTimeout within 15 s, its message holds each rank's Python stack (rank 0 in all_reduce, rank 1 asleep in the user's function)."
    from mpify_fastai import LaunchTimeout, in_torchddp
    from recovery_helpers import stuck_in_collective
    assert in_torchddp(2, int) == [0, 0]   # the session's warm server is up, as in a notebook after its first launch
    t = time.monotonic()
    with pytest.raises(LaunchTimeout) as ei: in_torchddp(2, stuck_in_collective, timeout=5)
    assert time.monotonic() - t < 15
    msg = str(ei.value)
    rank0, rank1 = msg.split('--- where rank 0 was ---')[1].split('--- where rank 1 was ---')
    assert 'in all_reduce' in rank0 and 'stuck_in_collective' in rank0
    assert 'stuck_in_collective' in rank1 and 'all_reduce' not in rank1
    assert ei.value.stacks in msg

@pytest.mark.parametrize('then', ['raise', 'hang'])
def test_stubborn_grandchildren_are_gone_after_a_stop(tmp_path, then):
    "A worker's child that ignores SIGTERM is killed too when the launch stops, on a failure or a timeout."
    from mpify_fastai import LaunchTimeout, ranch
    from recovery_helpers import child_ignoring_sigterm
    with pytest.raises(WorkerError if then == 'raise' else LaunchTimeout):
        ranch(2, child_ignoring_sigterm, str(tmp_path), then, timeout=None if then == 'raise' else 8)
    pids = [int((tmp_path / f'child-{r}').read_text()) for r in (0, 1) if (tmp_path / f'child-{r}').exists()]
    assert pids
    deadline = time.monotonic() + 3
    while any(helpers.alive(p) for p in pids) and time.monotonic() < deadline: time.sleep(0.05)
    assert not any(helpers.alive(p) for p in pids), "a child that ignores SIGTERM outlived the stop"

def test_sigterm_grace_lets_a_worker_run_its_handler(tmp_path):
    "When a launch stops its workers, SIGTERM comes first and a grace follows: a rank's SIGTERM handler gets to finish."
    from mpify_fastai import ranch
    from recovery_helpers import cleans_up_on_sigterm
    with pytest.raises(WorkerError, match='rank 1 fails'): ranch(2, cleans_up_on_sigterm, str(tmp_path))
    assert (tmp_path / 'term-0').read_text() == 'cleaned up'

KILLED_CALLER = '''
import sys
sys.path.insert(0, {tests!r})
import mpify_fastai
from fastai.metrics import accuracy
from fastai_helpers import digits_dls_plain, mlp, sgd_learner
from recovery_helpers import SlowEpochs
if __name__ == "__main__":
    learn = sgd_learner(digits_dls_plain(256, 128, bs=32, shuffle=True), mlp(), metrics=accuracy)
    learn.fit_ddp(20, 0.1, nprocs=2, cbs=[SlowEpochs(sys.argv[1])])
'''

def test_a_killed_callers_folders_are_swept_by_the_next_call(tmp_path):
    "A caller SIGKILLed mid-run leaves its checkpoint and rendezvous folders; the next launch anywhere removes them."
    import glob, tempfile
    p = _start_script(tmp_path, KILLED_CALLER)
    try: helpers.wait_for_files([tmp_path / 'done-1'], timeout=120, proc=p)
    finally: p.kill(); p.communicate()
    mine = lambda: glob.glob(f'{tempfile.gettempdir()}/mpify-{p.pid}-*') + glob.glob(f'/dev/shm/mpify-{p.pid}-*')
    left = mine()
    assert any('-ckpt-' in d for d in left) and any('-store-' in d for d in left), left
    assert any(os.path.exists(f'{d}/last_epoch.pth') for d in left)
    deadline = time.monotonic() + 10   # its workers die with it (parent-death signal)
    while helpers.children_of(p.pid) and time.monotonic() < deadline: time.sleep(0.1)
    from mpify_fastai import in_torchddp
    assert in_torchddp(1, int) == [0]
    assert mine() == []

SMALL_SHM = '''
import sys
sys.path.insert(0, {tests!r})
import torch
from mpify_fastai import ranch
from recovery_helpers import sum_and_big_result
if __name__ == "__main__":
    (s0, _), (s1, _) = ranch(2, sum_and_big_result, torch.ones(12_000_000), 10)   # 48 MB in: more than 32 MB holds
    print("IN", s0, s1, flush=True)
    (s0, r0), (s1, r1) = ranch(2, sum_and_big_result, torch.ones(1000), 5_000_000)   # 2 x 20 MB out: more than fits
    print("OUT", s0, s1, r0.numel(), float(r0[0]), float(r1[0]), flush=True)
'''

def test_small_dev_shm_falls_back_to_disk(tmp_path):
    "With Docker's kind of small /dev/shm (a 32 MB tmpfs in a private mount namespace), a 48 MB call, then results of 2 x 20 MB, go through disk with a line saying so; nothing is left behind."
    if subprocess.run(['unshare', '-m', 'true'], capture_output=True).returncode != 0:
        pytest.skip('unshare -m is not permitted here (needs root or user namespaces)')
    script = tmp_path / 'small_shm.py'
    script.write_text(SMALL_SHM.format(tests=str(helpers.REPO / 'tests')))
    r = subprocess.run(['unshare', '-m', 'sh', '-c', f'mount -t tmpfs -o size=32m tmpfs /dev/shm && {sys.executable} {script}; '
                        'echo "LEFT $(ls -A /dev/shm)"'], capture_output=True, text=True, timeout=180,
                       env=helpers.subprocess_env(MPIFY_PREWARM=0))
    assert 'IN 12000000.0 12000000.0' in r.stdout and 'OUT 1000.0 1000.0 5000000 0.0 1.0' in r.stdout, r.stderr[-3000:]
    assert r.stderr.count("has no room for this call's data") == 1 and "--shm-size" in r.stderr
    assert 1 <= r.stderr.count("is full; rank") <= 2, r.stderr[-3000:]   # the second result may still fit once the first moved
    assert 'LEFT \n' in r.stdout or r.stdout.rstrip().endswith('LEFT'), r.stdout
