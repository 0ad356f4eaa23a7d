"""The torchrun bridge: `learn.save_ddp_job` -> `torchrun ... -m mpify_fastai run job.pkl` -> `learn.load_ddp_result`.

Real torchrun agents and workers on 127.0.0.1 with c10d rendezvous, real fastai training on scikit-learn's digits.
Every torchrun starts in its own session and is killed with all its workers if it overruns; after each test no
process may remain whose working directory or command line lies in the test's folder.
Each torchrun costs ~30-60 s here (every worker imports fastai): the default set runs the two-node job and the
fast checks, `-m slow` the rest.
"""
from __future__ import annotations
import json, math, os, pickle, shutil, signal, stat, subprocess, sys, textwrap, time, uuid
from pathlib import Path
import pytest
import helpers
from helpers import free_port
from recovery_helpers import MOMENTS

TESTS = Path(__file__).resolve().parent
_SCRIPT = Path(sys.executable).with_name('torchrun')
TORCHRUN = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, '-m', 'torch.distributed.run']
LR = 1e-2

pytestmark = pytest.mark.usefixtures('no_leftovers', 'no_strays')

# ---------------------------------------------------------------- processes

def run_env(tests_on_path: bool = True) -> dict:
    "This checkout importable, and the tests folder (for callbacks in `job_helpers`) if `tests_on_path`; one thread per worker."
    env = helpers.subprocess_env(OMP_NUM_THREADS=1)
    if not tests_on_path: env['PYTHONPATH'] = os.pathsep.join(p for p in env['PYTHONPATH'].split(os.pathsep) if p != str(TESTS))
    for k in list(env):   # nothing from an enclosing torchrun/launcher may leak into these agents
        if k.startswith(('TORCHELASTIC_', 'MPIFY_')) or k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
            del env[k]
    return env

def _kill_tree(p: subprocess.Popen):
    "SIGKILL a torchrun and its workers (torchrun starts each worker in a session of its own)."
    kids = helpers.children_of(p.pid)
    try: os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError: pass
    for c in kids:
        try: os.killpg(c['pid'], signal.SIGKILL)
        except (ProcessLookupError, PermissionError): pass
    helpers.kill_quietly(c['pid'] for c in kids)
    p.wait()

def torchrun(runs: list[tuple[list[str], Path]], log_dir: Path, timeout: float = 240, env: dict | None = None) -> list[tuple[int, str]]:
    """Start one torchrun per `(args, cwd)` at once, wait for all; return each one's (exit code, output).
    Past `timeout` seconds every one still running is killed with its workers and the test fails."""
    procs = []
    try:
        for i, (args, cwd) in enumerate(runs):
            log = log_dir / f'torchrun-{i}.log'
            with open(log, 'wb') as f:
                procs.append((subprocess.Popen([*TORCHRUN, *args], cwd=cwd, env=env or run_env(), stdout=f,
                                               stderr=subprocess.STDOUT, start_new_session=True), log))
        start = time.monotonic()
        deadline = start + timeout
        while time.monotonic() < deadline and any(p.poll() is None for p, _ in procs):
            if any(p.returncode for p, _ in procs):   # one failed: give the others a little time, not the rendezvous timeout
                deadline = min(deadline, time.monotonic() + 30)
            time.sleep(0.2)
        outs = [(p.returncode, helpers.strip_ansi(log.read_text(errors='replace'))) for p, log in procs]
        assert all(rc is not None for rc, _ in outs), (f"torchrun still running {time.monotonic() - start:.0f} s after its start "
            f"(limit {timeout} s, or 30 s after another one failed); exit codes {[rc for rc, _ in outs]}, outputs:\n"
            + '\n-----\n'.join(o[-5000:] for _, o in outs))
        return outs
    finally:
        for p, _ in procs:
            if p.poll() is None: _kill_tree(p)

def rdzv(port: int, nnodes: int = 1, nproc: int = 2, *extra: str) -> list[str]:
    return [f'--nnodes={nnodes}', f'--nproc-per-node={nproc}', '--rdzv-backend=c10d', f'--rdzv-endpoint=127.0.0.1:{port}',
            f'--rdzv-id=mpify-test-{uuid.uuid4().hex[:8]}', *extra]

RUN = ['-m', 'mpify_fastai', 'run', 'job.pkl', '--result', 'result.pth']

def _strays(root: str) -> list[dict]:
    "Live processes other than this one whose working directory or command line lies under `root`."
    out = []
    for d in os.listdir('/proc'):
        if not d.isdigit() or int(d) == os.getpid() or not helpers.alive(int(d)): continue
        try: cwd = os.readlink(f'/proc/{d}/cwd')
        except OSError: cwd = ''
        cmd = helpers._cmdline(int(d))
        if cwd == root or cwd.startswith(root + os.sep) or root + os.sep in cmd: out.append(dict(pid=int(d), cwd=cwd, cmdline=cmd))
    return out

@pytest.fixture
def no_strays(tmp_path):
    "No torchrun agent or worker of this test survives it (workers are re-parented if their agent dies first)."
    yield
    deadline = time.monotonic() + 5
    while (left := _strays(str(tmp_path))) and time.monotonic() < deadline: time.sleep(0.1)
    helpers.kill_quietly(s['pid'] for s in left)
    assert not left, f"processes left behind: {left}"

def python_m(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, '-m', 'mpify_fastai', *args], cwd=cwd, env=run_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

def communicate(p: subprocess.Popen, timeout: float = 90) -> tuple[int, str, str]:
    try: out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(p); out, err = p.communicate()
        raise AssertionError(f"{p.args} did not finish in {timeout} s\n{out}\n{err}")
    return p.returncode, out, err

# ---------------------------------------------------------------- fastai side

def digits_learner(**kw):
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from mpify_fastai.demo import digits_cnn, digits_dls
    return Learner(digits_dls(), digits_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, **kw)

def load_and_validate(learn, result: Path, n_epoch: int, loss_scale: float = 1., metric_scale: float = 1.) -> list:
    """Apply `result` to `learn`; check the history has `n_epoch` complete rows and that `learn.validate()` here
    reproduces the last row (valid_loss, metric), up to the scales of a job's own loss and metric. Returns the rows."""
    import torch
    before = [p.detach().clone() for p in learn.model.parameters()]
    learn.load_ddp_result(result)
    rows = [[float(v) for v in r] for r in learn.recorder.values]
    assert len(rows) == n_epoch and all(len(r) == 3 and all(math.isfinite(v) for v in r) for r in rows), rows
    assert any(not torch.equal(a, b) for a, b in zip(before, learn.model.parameters())), "the weights did not change"
    assert (learn.epoch, learn.n_epoch) == (n_epoch - 1, n_epoch)
    valid_loss, metric = (float(v) for v in learn.validate())
    assert abs(valid_loss * loss_scale - rows[-1][1]) < 1e-4 * loss_scale, (valid_loss, rows[-1])
    assert abs(metric * metric_scale - rows[-1][2]) < 1e-4 * metric_scale, (metric, rows[-1])
    return rows

def one_cycle_lrs(n_iter: int, lr_max: float = LR, pct_start: float = 0.25, div: float = 25., div_final: float = 1e5) -> list:
    "The learning rate at each of `n_iter` training batches of an uninterrupted `fit_one_cycle`."
    from fastai.callback.schedule import combined_cos
    f = combined_cos(pct_start, lr_max / div, lr_max, lr_max / div_final)
    return [float(f(i / n_iter)) for i in range(n_iter)]

def check_history(result: Path, n_epoch: int):
    "One row per epoch, iteration counts as an uninterrupted fit has them, the one-cycle schedule followed batch by batch."
    import torch
    rec = torch.load(result, weights_only=False)['recorder']
    assert len(rec['values']) == n_epoch and all(len(r) == 3 for r in rec['values']), rec['values']
    iters = list(rec['iters'])
    assert len(iters) == n_epoch and all(a < b for a, b in zip(iters, iters[1:])), iters
    assert iters == [iters[0] * (e + 1) for e in range(n_epoch)], f"uneven epochs: {iters}"
    assert len(rec['losses']) == len(rec['lrs']) == iters[-1], (len(rec['losses']), len(rec['lrs']), iters)
    want = one_cycle_lrs(iters[-1])
    bad = [i for i, (a, b) in enumerate(zip(rec['lrs'], want)) if not math.isclose(float(a), b, rel_tol=1e-6)]
    assert not bad, f"learning rates off the one-cycle schedule at batches {bad[:10]}"

def save_job(learn, path: Path, n_epoch: int, **kwargs) -> Path:
    learn.save_ddp_job(path, n_epoch, LR, method='fit_one_cycle', **kwargs)
    return path

# ---------------------------------------------------------------- default set

def test_two_nodes_on_localhost_train_one_job(tmp_path):
    "Two torchrun agents (two 'nodes', one worker each) form one group: one result, which validates in the caller; each rank's global RNGs are its own."
    from app_helpers import RecordRNG
    learn = digits_learner()
    (rngs := tmp_path / 'rng').mkdir()
    job = save_job(learn, tmp_path / 'job.pkl', 2, cbs=[RecordRNG(str(rngs))])
    nodes = [tmp_path / 'node0', tmp_path / 'node1']
    for n in nodes:
        n.mkdir()
        shutil.copy(job, n / 'job.pkl')
    args = rdzv(free_port(), 2, 1) + RUN
    runs = torchrun([(args, n) for n in nodes], tmp_path, timeout=180)
    for rc, out in runs: assert rc == 0, out[-6000:]
    results = [n / 'result.pth' for n in nodes if (n / 'result.pth').exists()]
    assert len(results) == 1, f"expected one result (rank 0's), found {results}"
    home = results[0].parent
    for n in nodes:   # no checkpoint or temp file left behind, on either node
        assert sorted(os.listdir(n)) == (['job.pkl', 'result.pth'] if n == home else ['job.pkl'])
    assert stat.S_IMODE(results[0].stat().st_mode) == 0o600
    tables = [out for _, out in runs if 'train_loss' in out]
    assert len(tables) == 1, "exactly one node (rank 0's) shows the progress table"
    load_and_validate(learn, results[0], 2)
    draws = [json.loads((rngs / f'rng{r}.json').read_text()) for r in (0, 1)]
    for name, k in (('Python', 0), ('numpy', 1), ('torch', 2)):   # dropout masks, augmentation: not the same on every rank
        assert all(a[k] != b[k] for a, b in zip(*draws)), f"ranks draw the same {name} random numbers: {draws}"

def test_cli_refuses_group_writable_job_and_non_job_file(tmp_path):
    "Both fail before any group forms: exit code 2, one clear line (no torchrun needed)."
    job = save_job(digits_learner(), tmp_path / 'job.pkl', 1)
    assert stat.S_IMODE(job.stat().st_mode) == 0o600
    os.chmod(job, 0o660)
    junk = tmp_path / 'notes.txt'
    junk.write_text('epoch 1: looks good\n')
    os.chmod(junk, 0o600)
    procs = [python_m(['run', str(job), '--result', str(tmp_path / 'r1.pth')], tmp_path),
             python_m(['run', str(junk), '--result', str(tmp_path / 'r2.pth')], tmp_path)]
    (rc1, out1, err1), (rc2, out2, err2) = [communicate(p) for p in procs]
    assert rc1 == 2, err1
    assert 'writable by group or others' in err1 and f'chmod go-w {job}' in err1, err1
    assert 'Traceback' not in err1 and not out1
    assert rc2 == 2, err2
    assert f'{junk} is not an mpify_fastai job file' in err2 and 'Traceback' not in err2, err2
    assert not list(tmp_path.glob('r*.pth*'))

def _evil_job(path: Path, marker: Path, mode: int):
    "A file with a valid job header whose payload, once unpickled, creates `marker`."
    class Evil:
        def __reduce__(self): return (os.mkdir, (str(marker),))
    path.write_bytes(pickle.dumps({'version': 2, 'imports': ''}) + pickle.dumps(Evil()))
    os.chmod(path, mode)

@pytest.mark.parametrize('mode', [0o620, 0o602, 0o666], ids=oct)
def test_load_refuses_writable_job_before_running_anything(tmp_path, mode):
    from mpify_fastai.job import JobFileError, load_ddp_job
    job, marker = tmp_path / 'job.pkl', tmp_path / 'pwned'
    _evil_job(job, marker, mode)
    with pytest.raises(JobFileError, match=r'writable by group or others .* chmod go-w'):
        load_ddp_job(job)
    assert not marker.exists(), "the payload ran although the file was refused"
    os.chmod(job, 0o600)   # the same file, private: it is loaded (which is why the check must come first)
    with pytest.raises(JobFileError, match='holds no mpify_fastai job'): load_ddp_job(job)
    assert marker.exists()

def test_load_gives_clear_errors_for_what_is_not_a_job(tmp_path):
    from mpify_fastai.job import JobFileError, load_ddp_job
    (tmp_path / 'list.pkl').write_bytes(pickle.dumps([1, 2]))
    (tmp_path / 'old.pkl').write_bytes(pickle.dumps({'version': 0, 'imports': ''}) + pickle.dumps({}))
    (tmp_path / 'folder').mkdir()
    for name in ('list.pkl', 'old.pkl'): os.chmod(tmp_path / name, 0o600)
    for name, msg in [('missing.pkl', 'does not exist'), ('list.pkl', 'is not an mpify_fastai job file'),
                      ('old.pkl', 'is not an mpify_fastai job file of version 2'), ('folder', 'is not a regular file')]:
        with pytest.raises(JobFileError, match=msg): load_ddp_job(tmp_path / name)

def _tiny_learner():
    import torch
    from torch import nn
    from fastai.callback.core import Callback
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    import fastai.callback.schedule  # noqa: F401  (fit_one_cycle, fit_flat_cos, fit_sgdr)
    class Trained(Callback):
        def before_fit(self): self.epochs = []
        def before_train(self): self.epochs.append(self.epoch)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 4, generator=g)
    ds = list(zip(X, (X[:, 0] > 0).long()))
    return Learner(DataLoaders.from_dsets(ds[:48], ds[48:], bs=16), nn.Linear(4, 2), loss_func=CrossEntropyLossFlat(), cbs=Trained())

@pytest.mark.parametrize('method', ['fit', 'fit_one_cycle', 'fit_flat_cos', 'fit_sgdr'])
def test_resumable_schedules_skip_the_checkpointed_epochs(method):
    "What a restarted group calls: every schedule listed as resumable trains only the epochs after the checkpoint."
    from mpify_fastai.recovery import RESUMABLE, resume_kwargs
    assert method in RESUMABLE
    args = {'fit_sgdr': (2, 1)}.get(method, (3,))   # 3 epochs each (sgdr: 1 + 2)
    learn = _tiny_learner()
    with learn.no_bar(), learn.no_logging(): getattr(learn, method)(*args, **resume_kwargs(method, {}, 2))
    assert learn.trained.epochs == [2]
    assert [len(r) for r in learn.recorder.values] == [0, 0, 2]   # skipped epochs leave empty rows: the job refills them

# ---------------------------------------------------------------- slow

@pytest.mark.slow
def test_one_node_two_processes(tmp_path):
    learn = digits_learner()
    save_job(learn, tmp_path / 'job.pkl', 2)
    (rc, out), = torchrun([(rdzv(free_port()) + RUN, tmp_path)], tmp_path, timeout=180)
    assert rc == 0, out[-6000:]
    assert not list(tmp_path.glob('*.ckpt')) and not list(tmp_path.glob('.*tmp*'))
    load_and_validate(learn, tmp_path / 'result.pth', 2)

def _restart_run(tmp_path, n_epoch: int, kills: dict | None, max_restarts: int, cbs: list = ()) -> str:
    "Train with rank 1 SIGKILLed at the end of epoch `kills[attempt]` (`KillRank`), or as `cbs` do."
    from job_helpers import KillRank
    learn = digits_learner()
    save_job(learn, tmp_path / 'job.pkl', n_epoch, cbs=[KillRank(kills)] if kills else list(cbs))
    (rc, out), = torchrun([(rdzv(free_port(), 1, 2, f'--max-restarts={max_restarts}') + RUN, tmp_path)], tmp_path, timeout=270)
    assert rc == 0, out[-8000:]
    assert not (tmp_path / 'result.pth.ckpt').exists(), "the checkpoint outlived a finished job"
    check_history(tmp_path / 'result.pth', n_epoch)
    load_and_validate(learn, tmp_path / 'result.pth', n_epoch)
    return out

@pytest.mark.slow
def test_restarted_group_resumes_from_checkpoint(tmp_path):
    "Rank 1 is SIGKILLed at the end of epoch 1 (once it is checkpointed); the restarted group trains epoch 2 only."
    out = _restart_run(tmp_path, 3, {0: 1}, max_restarts=1)
    said = 'mpify_fastai: resuming from result.pth.ckpt with 2 of 3 epochs done (epochs 0-1): training from epoch 2'
    assert out.count(said) == 1, out[-8000:]
    assert 'resuming' not in out.split('resuming from')[1], "resumed more than once"

@pytest.mark.slow
def test_second_restart_resumes_with_complete_history(tmp_path):
    "Two failures, in the first attempt and in the resumed one: the history still has every epoch once."
    out = _restart_run(tmp_path, 3, {0: 0, 1: 1}, max_restarts=2)
    for e in ('1 of 3 epochs done (epoch 0): training from epoch 1', '2 of 3 epochs done (epochs 0-1): training from epoch 2'):
        assert out.count(f'resuming from result.pth.ckpt with {e}') == 1, out[-8000:]

@pytest.mark.slow
def test_restart_between_the_final_checkpoint_and_the_result_writes_it_from_there(tmp_path):
    """Rank 0 SIGKILLed after it saved the fit's finished state, before that became result.pth: the restarted group trains
    nothing and moves it into place; one result, one row per epoch, = validate()."""
    from recovery_helpers import StopAt
    out = _restart_run(tmp_path, 3, None, 1, cbs=[StopAt(str(tmp_path), 'result', rank=0)])
    assert (tmp_path / 'epochs').read_text().splitlines() == ['0 0', '0 1', '0 2']
    assert (tmp_path / 'attempts').read_text().split() == ['0']
    assert out.count('this job already finished: its final checkpoint result.pth.ckpt becomes result.pth; nothing is '
                     'trained') == 1, out[-8000:]

@pytest.mark.parametrize('moment', [pytest.param(m, marks=() if m == 'result' else pytest.mark.slow) for m in MOMENTS])
def test_restart_at_each_moment_resumes_from_the_last_completed_epoch(tmp_path, moment):
    """torchrun --max-restarts=1, rank 1 SIGKILLed once at `moment` of fit_one_cycle(3): the restarted group trains only
    the epochs after the last checkpointed one (all of them before the first epoch ended, none once the last one is
    checkpointed); killed after rank 0 wrote the result, the restarted group finds this job's result there and trains and
    writes nothing. One result, one row per epoch, the one-cycle schedule, = validate()."""
    from recovery_helpers import StopAt
    result = tmp_path / 'result.pth'
    out = _restart_run(tmp_path, 3, None, 1, cbs=[StopAt(str(tmp_path), moment, result=str(result) if moment == 'result' else None)])
    epochs = (tmp_path / 'epochs').read_text().splitlines()
    again = {'first_epoch': ['1 0', '1 1', '1 2'], 'last_epoch': ['1 2'], 'last_epoch_end': [], 'result': []}[moment]
    assert epochs == ['0 0', '0 1', '0 2'][:3 if moment != 'first_epoch' else 1] + again, epochs
    assert sorted(os.listdir(tmp_path)) == sorted(['job.pkl', 'result.pth', 'epochs', 'attempts', 'torchrun-0.log']
                                                  + (['result-seen'] if moment == 'result' else []))
    finished = ('this job already finished: result.pth holds its result; nothing is trained or written (to train it again, '
                'remove result.pth)')
    if moment == 'result':
        st = result.stat()
        assert (tmp_path / 'result-seen').read_text() == f"{st.st_mtime_ns} {st.st_size}", "the result was rewritten"
        assert (tmp_path / 'attempts').read_text().split() == ['0'] and out.count(finished) == 1, out[-8000:]
    else: assert (tmp_path / 'attempts').read_text().split() == ['0', '1'] and finished not in out, out[-8000:]

def test_result_of_another_job_is_not_taken_for_this_ones(tmp_path, capsys):
    "Only a result that carries this job's digest finishes it: one of another job, of no job, or not a result at all is replaced."
    import torch
    from mpify_fastai.job import holds_result
    res = tmp_path / 'result.pth'
    assert not holds_result(res, 'a' * 64)
    torch.save({'state_dict': {}, 'job_digest': 'a' * 64}, res)
    assert holds_result(res, 'a' * 64) and capsys.readouterr().out == ''
    for other in ({'state_dict': {}, 'job_digest': 'b' * 64}, {'state_dict': {}}):
        torch.save(other, res)
        assert not holds_result(res, 'a' * 64)
    res.write_text('not a result')
    assert not holds_result(res, 'a' * 64)
    assert capsys.readouterr().out.count(f"{res} holds another job's result; this job's will replace it") == 3

BUILD = '''
import os
os.umask(0)                                        # a careless writer would leave the job world-writable
open("job.pkl", "w").close(); os.chmod("job.pkl", 0o666)
import torch.nn.functional as F
from fastai.learner import Learner
from fastai.metrics import AvgMetric
import mpify_fastai
from mpify_fastai.demo import digits_cnn, digits_dls

LOSS_SCALE = 2.0
loss_fn = lambda out, targ: F.cross_entropy(out, targ) * LOSS_SCALE

def _hits(out, targ): return (out.argmax(dim=-1) == targ).float()
def pct_correct(out, targ): return 100 * _hits(out, targ).mean()

if __name__ == "__main__":
    learn = Learner(digits_dls(), digits_cnn(), loss_func=loss_fn, metrics=AvgMetric(pct_correct))
    learn.save_ddp_job("job.pkl", 2, 1e-2, method="fit_one_cycle")
'''

@pytest.mark.slow
def test_job_from_script_main_runs_elsewhere(tmp_path):
    """A job saved by a script whose `__main__` defines the loss (a lambda and the global it reads) and the metric
    is private (0600), holds its tensors itself, and trains from another folder after the script's folder is gone."""
    build, work = tmp_path / 'notebook', tmp_path / 'elsewhere'
    build.mkdir(); work.mkdir()
    (build / 'build.py').write_text(textwrap.dedent(BUILD))
    r = helpers.run_script(build / 'build.py', timeout=120)
    assert r.returncode == 0, r.stderr
    job = build / 'job.pkl'
    assert stat.S_IMODE(job.stat().st_mode) == 0o600
    data = job.read_bytes()
    assert b'/dev/shm' not in data and b'mpify-' not in data, "the job refers to scratch files instead of holding its tensors"
    shutil.move(job, work / 'job.pkl')
    shutil.rmtree(build)
    (rc, out), = torchrun([(['--standalone', '--nproc-per-node=2'] + RUN, work)], tmp_path, timeout=180,
                          env=run_env(tests_on_path=False))
    assert rc == 0, out[-6000:]
    import torch
    assert 'pct_correct' in torch.load(work / 'result.pth', weights_only=False)['recorder']['metric_names']
    load_and_validate(digits_learner(), work / 'result.pth', 2, loss_scale=2.0, metric_scale=100.0)


def test_checkpoint_of_another_job_is_not_resumed(tmp_path):
    "A checkpoint left by an earlier, different job under the same --result is ignored, not loaded into this job."
    import torch
    from mpify_fastai.recovery import resumable_checkpoint
    ck = tmp_path / 'result.pth.ckpt'
    torch.save({'completed_epoch': 1, 'job_digest': 'a' * 64}, ck)
    assert resumable_checkpoint(ck, 'fit', 'b' * 64) is None
    assert resumable_checkpoint(ck, 'fit', 'a' * 64)['completed_epoch'] == 1
    assert resumable_checkpoint(ck, 'fine_tune', 'a' * 64) is None   # cannot skip epochs: starts over
    assert resumable_checkpoint(tmp_path / 'none.ckpt', 'fit', 'a' * 64) is None

def test_cli_refuses_missing_result_folder_at_once(tmp_path):
    "A --result in a folder that does not exist is refused before any training (and before torch is imported)."
    import subprocess, sys, time
    job = tmp_path / 'job.pkl'
    job.write_bytes(pickle.dumps({'version': 1, 'imports': ''})); os.chmod(job, 0o600)
    t = time.monotonic()
    r = subprocess.run([sys.executable, '-m', 'mpify_fastai', 'run', str(job), '--result', str(tmp_path / 'no' / 'r.pth')],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and 'does not exist' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert time.monotonic() - t < 8, "refusal should not wait for torch/fastai to import"
