"""`learn.ddp(executor=ex)`: a DDP fit as one SLURM job, submitted with submitit, against a real SLURM cluster.

The cluster (`slurm_cluster.SlurmCluster`, one for the whole file, up in ~5-7 s) runs on this host from the Debian
packages: munged, MariaDB + slurmdbd, slurmctld and two slurmd "nodes" n1 and n2 (1 CPU each), so a 2-node job has one
rank (gloo, CPU) on each. The tests skip, with the reason, where it cannot start (not root, packages missing: see
.ci/run). Every job's tasks import fastai (~6 s each on these 2 cores): a job costs ~10-30 s here. The default set
takes ~2 minutes; `-m slow` adds the requeues at each moment and the kernel restart (~4 minutes more).
The callbacks below travel in job files by reference: the workers import this module (the tests folder is on their path).
"""
from __future__ import annotations
import os, random, re, signal, subprocess, sys, time
from pathlib import Path
import pytest
from fastai.callback.core import Callback
import helpers

TESTS = Path(__file__).resolve().parent
LR = 1e-2

# ---------------------------------------------------------------- callbacks the ranks run

class SeedAtFit(Callback):
    "Every rank's global RNGs seeded alike before the DistributedRunner draws the epoch order: two runs, one data order."
    order = 0
    def before_fit(self):
        import numpy as np, torch
        random.seed(0); np.random.seed(0); torch.manual_seed(0)

class RaiseOnRank(Callback):
    "Rank `rank` raises as the fit begins, before any collective (order 0: before the DistributedRunner wraps the model)."
    def __init__(self, rank: int = 1): self.rank = rank
    def before_fit(self):
        if int(os.environ.get('RANK', 0)) == self.rank: raise ValueError(f"rank {self.rank} fails on purpose")

class StallRank(Callback):
    "Rank `rank` works on alone for `seconds` as the fit begins (rank-0-only work before any collective)."
    def __init__(self, rank: int = 0, seconds: float = 120): self.rank,self.seconds = rank,seconds
    def before_fit(self):
        if int(os.environ.get('RANK', 0)) == self.rank: time.sleep(self.seconds)

class SlowEpochs(Callback):
    "Each epoch ends `seconds` later (after its checkpoint): time to interrupt or requeue a run mid-way."
    order = 90
    def __init__(self, seconds: float): self.seconds = seconds
    def after_epoch(self): time.sleep(self.seconds)

# ---------------------------------------------------------------- the cluster

@pytest.fixture(scope='module')
def slurm(tmp_path_factory):
    """The private SLURM cluster of this file's tests (one for all; stopped when they end, so the rest of a session never
    sees its daemons); SLURM commands and submitit in this process (and its children) use it."""
    pytest.importorskip('submitit', reason='the SLURM path needs submitit: pip install -e ".[slurm]"')
    from slurm_cluster import ClusterUnavailable, SlurmCluster
    cluster = SlurmCluster(tmp_path_factory.mktemp('slurm'))
    try: cluster.start()
    except ClusterUnavailable as e: pytest.skip(f"no SLURM test cluster: {e}")
    print(f"\nSLURM test cluster up in {cluster.start_s:.1f} s", file=sys.stderr)
    env = {**cluster.env, 'PYTHONPATH': helpers.subprocess_env()['PYTHONPATH']}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try: yield cluster
    finally:
        cluster.stop()
        for k, v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v

@pytest.fixture
def executor(slurm, tmp_path):
    "A submitit executor as a user configures one: 2 nodes, one task (rank) on each."
    import submitit
    ex = submitit.AutoExecutor(folder=tmp_path / 'runs', cluster='slurm')
    ex.update_parameters(nodes=2, tasks_per_node=1, cpus_per_task=1, timeout_min=10, slurm_partition='test')
    yield ex
    assert_queue_empty(slurm, within=15)

def assert_queue_empty(slurm, within: float):
    deadline = time.monotonic() + within
    while (left := slurm.jobs()) and time.monotonic() < deadline: time.sleep(0.2)
    if left: slurm.run('scancel', *left, check=False)
    assert not left, f"jobs still queued or running {within} s after the test: {left}"

def digits_learner(model=None, dls=None):
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from mpify_fastai.demo import digits_cnn, digits_dls
    return Learner(dls or digits_dls(), model or digits_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)

def rows(learn) -> list[list[float]]: return [[float(v) for v in r] for r in learn.recorder.values]

def run_folder(ex) -> Path:
    runs = sorted(Path(ex.folder).glob('mpify-*'))
    assert len(runs) == 1, runs
    return runs[0]

def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (v := cond()): return v
        time.sleep(0.2)
    raise AssertionError(f"{what} (waited {timeout} s)")

def checkpointed_epoch(folder: Path) -> int | None:
    "The last completed epoch in a run folder's checkpoint, if any."
    import torch
    try: return torch.load(folder / 'result.pth.ckpt', weights_only=False)['completed_epoch']
    except (FileNotFoundError, EOFError, RuntimeError): return None

# ---------------------------------------------------------------- tests

def test_two_node_job_trains_as_fit_ddp_does(executor, slurm, capsys):
    "One rank on each slurmd; the same last row as `fit_ddp(nprocs=2)` from the same weights and data order; every epoch drawn."
    import copy
    from mpify_fastai.demo import digits_cnn, digits_dls
    dls, model = digits_dls(), digits_cnn()
    here, there = digits_learner(copy.deepcopy(model), dls), digits_learner(model, dls)
    t = time.monotonic()
    assert there.ddp(executor=executor).fit_one_cycle(3, LR, cbs=[SeedAtFit()]) is None
    took = time.monotonic() - t
    out = helpers.strip_ansi(capsys.readouterr().out)
    here.ddp(nprocs=2).fit_one_cycle(3, LR, cbs=[SeedAtFit()])
    got, want = rows(there), rows(here)
    assert len(got) == 3 and all(abs(a - b) < 1e-5 for a, b in zip(got[-1], want[-1])), (got, want)
    with there.no_bar(): val = [float(v) for v in there.validate()]
    assert all(abs(a - b) < 1e-5 for a, b in zip(got[-1][1:], val)), (got[-1], val)
    assert re.search(r'submitted SLURM job \d+ \(2 ranks\)', out), out
    table = [l.split() for l in out.splitlines() if re.match(r'\s*\d+\s+\d+\.\d{6}', l)]
    assert [int(r[0]) for r in table] == [0, 1, 2], out     # every epoch's row, once
    folder = run_folder(executor)
    assert oct((folder / 'job.pkl').stat().st_mode & 0o777) == '0o600'
    nodes = {l.split('|')[1] for l in slurm.run('sacct', '-n', '-P', '-X', '-o', 'JobID,NodeList').splitlines() if l}
    assert any(n in ('n[1-2]', 'n1,n2') for n in nodes), nodes   # the job spanned both nodes
    print(f"SLURM job: {took:.1f} s", file=sys.stderr)

def test_failing_rank_is_reported_with_its_traceback_and_the_others_cancelled(executor, slurm):
    """Rank 1 raises while rank 0 works on alone for 120 s: the job is cancelled at once, as fit_ddp stops its workers (the
    error within 30 s of rank 1's failure, the queue empty 15 s later); a WorkerError naming rank 1, with its traceback
    read from the job's files; the Learner is untouched."""
    from mpify_fastai import WorkerError
    learn = digits_learner()
    before = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(WorkerError) as e: learn.ddp(executor=executor).fit(2, LR, cbs=[RaiseOnRank(1), StallRank(0, 120)])
    failed = time.time() - (run_folder(executor) / 'failure-1.json').stat().st_mtime
    assert failed < 30, f"the job went on {failed:.0f} s after rank 1 failed"
    assert_queue_empty(slurm, within=15)
    assert e.value.rank == 1 and e.value.exc_type == 'ValueError', str(e.value)
    assert 'rank 1 fails on purpose' in str(e.value) and 'in before_fit' in e.value.remote_traceback, str(e.value)
    assert all((a == b).all() for a, b in zip(before, learn.model.parameters()))

def test_executor_without_schedule_or_with_nprocs_is_refused(executor):
    from mpify_fastai import ArgumentError
    learn = digits_learner()
    with pytest.raises(ArgumentError, match='schedules'): learn.ddp(executor=executor).get_preds()
    with pytest.raises(ArgumentError, match='exclude'): learn.ddp(nprocs=2, executor=executor)
    with pytest.raises(ArgumentError, match='drop max_restarts'): learn.ddp(executor=executor, max_restarts=2)
    with pytest.raises(ArgumentError, match='submitit executor for SLURM'): learn.ddp(executor=object()).fit(1)

def test_executor_without_submitit_says_how_to_install(monkeypatch):
    "Where submitit is not installed (an import of it fails), `executor=` says how to install it."
    from mpify_fastai import ArgumentError
    monkeypatch.setitem(sys.modules, 'submitit', None)   # what `import submitit` finds: ImportError, as when not installed
    with pytest.raises(ArgumentError) as e: digits_learner().ddp(executor=object()).fit(1)
    assert str(e.value) == 'executor= needs submitit: pip install submitit (or pip install -e ".[slurm]")'

def test_event_log_hands_out_whole_events_only(tmp_path):
    "The progress file between rank 0 and the caller: appended events come out once each, a half-written one not yet."
    import pickle, struct
    from mpify_fastai.progress import EventLog, EpochStarted, FitResumed
    writer, reader = EventLog(tmp_path / 'events.log'), EventLog(tmp_path / 'events.log')
    assert reader.read() == []
    writer.append(EpochStarted(0)); writer.append(FitResumed(1, 1))
    data = pickle.dumps(EpochStarted(1))
    with open(tmp_path / 'events.log', 'ab') as f: f.write(struct.pack('<Q', len(data)) + data[:5])   # a write under way
    assert reader.read() == [EpochStarted(0), FitResumed(1, 1)] and reader.read() == []
    with open(tmp_path / 'events.log', 'ab') as f: f.write(data[5:])
    assert reader.read() == [EpochStarted(1)]
    assert oct((tmp_path / 'events.log').stat().st_mode & 0o777) == '0o600'

def test_attach_to_a_folder_without_runs_says_so(tmp_path):
    from mpify_fastai import ArgumentError, attach
    with pytest.raises(ArgumentError, match='holds no mpify_fastai SLURM run'): attach(tmp_path, digits_learner())

def start_again(slurm, job_id: str):
    """Start a requeued job without waiting out SLURM's BeginTime hold, once what the hold guards against is past: its nodes
    idle (each slurmd has revoked the old run's credential), then a second more. A credential made in the second of the
    revocation counts as revoked (whole seconds): that start would be killed ("Job credential revoked") and never run."""
    wait_for(lambda: slurm.run('squeue', '-h', '-j', job_id, '-o', '%T').strip() == 'PENDING', 30, "the job was not requeued")
    wait_for(lambda: set(slurm.run('sinfo', '-h', '-o', '%T').split()) == {'idle'}, 30, "the requeued job's nodes stayed busy")
    time.sleep(1.1)
    slurm.run('scontrol', 'update', f'jobid={job_id}', 'StartTime=now', check=False)

def requeue(slurm, job_id: str):
    "`scontrol requeue` the job and start it again without waiting out SLURM's BeginTime hold."
    slurm.run('scontrol', 'requeue', job_id)
    start_again(slurm, job_id)

def folder_files(folder: Path) -> dict:
    "Every file of a run folder but its event log: name -> (bytes, mtime)."
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.name != 'events.log'}

def test_finished_job_requeued_never_trains_again(executor, slurm, capsys):
    """A job requeued after it wrote its result (`scontrol requeue` of the finished job, as when a requeue comes in a job's
    last seconds and it finishes inside the kill grace): the requeued job finds the result, says so in the event log and
    the table, trains nothing and rewrites nothing; the Learner keeps what it applied."""
    from mpify_fastai import attach
    from mpify_fastai.job import RunFinished
    from mpify_fastai.progress import EventLog, FitStarted, RowLogged
    learn = digits_learner()
    learn.ddp(executor=executor).fit_one_cycle(2, LR)
    run, applied = attach(run_folder(executor), learn), rows(learn)
    log = EventLog(run.folder / 'events.log')
    assert sum(isinstance(e, RowLogged) for e in log.read()) == 2
    before = folder_files(run.folder)
    assert 'result.pth' in before and 'result.pth.ckpt' not in before, before.keys()
    requeue(slurm, run.job_id)
    wait_for(lambda: not slurm.jobs(), 120, "the requeued job did not end")
    again = log.read()
    assert again == [RunFinished(1)], \
        f"the requeued job logged {again} (sacct: {slurm.run('sacct', '-n', '-X', '-P', '-j', run.job_id, '-o', 'State,ExitCode')})"
    assert not any(isinstance(e, (FitStarted, RowLogged)) for e in again)
    assert folder_files(run.folder) == before, "the finished run's folder was rewritten"
    capsys.readouterr()
    run.progress()
    out = helpers.strip_ansi(capsys.readouterr().out)
    assert f'SLURM job {run.job_id} was started again (restart 1) after it had written its result: it trained nothing' in out, out
    assert rows(learn) == applied

@pytest.mark.slow
def test_job_requeued_in_its_last_seconds_finishes_and_never_trains_again(executor, slurm, tmp_path, capsys):
    """The issue's case: `scontrol requeue` while the job ends (held after its last epoch, released at once), it outlives
    the SIGTERM (submitit ignores it) and writes its result, which the caller applies, saying the job was requeued; SLURM
    then starts it again: it finds the result, trains and rewrites nothing; the Learner keeps its 3 rows, the last = validate()."""
    from mpify_fastai.job import RunFinished
    from mpify_fastai.progress import EventLog, RowLogged
    from recovery_helpers import StopAt
    learn = digits_learner()
    run = learn.ddp(executor=executor, wait=False).fit_one_cycle(3, LR, cbs=[StopAt(str(tmp_path), 'result', how='hold', rank=0)])
    wait_for(lambda: (tmp_path / 'stopped').exists(), 180, "the job did not reach its end")
    requeued = time.time()
    slurm.run('scontrol', 'requeue', run.job_id)
    (tmp_path / 'go').write_text('')
    run.wait()
    applied, before = rows(learn), folder_files(run.folder)
    assert (run.folder / 'result.pth').stat().st_mtime - requeued < 5, "the result was not written inside the kill grace"
    out = helpers.strip_ansi(capsys.readouterr().out)
    assert f'SLURM job {run.job_id} was requeued as it ended; its result is applied, and when SLURM starts it again it ' \
           'finds the result and exits without training' in out, out[-3000:]
    start_again(slurm, run.job_id)
    wait_for(lambda: not slurm.jobs(), 120, "the requeued job did not end")
    events = EventLog(run.folder / 'events.log').read()
    assert events[-1] == RunFinished(1) and sum(isinstance(e, RowLogged) for e in events) == 3, events
    assert folder_files(run.folder) == before, "the finished run's folder was rewritten"
    assert (tmp_path / 'epochs').read_text().splitlines() == ['0 0', '0 1', '0 2']
    with learn.no_bar(): val = [float(v) for v in learn.validate()]
    assert len(applied) == 3 and all(abs(a - b) < 1e-5 for a, b in zip(applied[-1][1:], val)), (applied, val)

SCRIPT = '''
import submitit, sys
sys.path[:0] = {paths!r}
from test_slurm import digits_learner, SlowEpochs
if __name__ == "__main__":
    ex = submitit.AutoExecutor(folder={runs!r}, cluster="slurm")
    ex.update_parameters(nodes=2, tasks_per_node=1, cpus_per_task=1, timeout_min=10, slurm_partition="test")
    learn = digits_learner()
    try: learn.ddp(executor=ex).fit_one_cycle(8, 1e-2, cbs=[SlowEpochs(1.0)])
    except KeyboardInterrupt: print("ROWS", len(learn.recorder.values), flush=True)
'''

def test_ctrl_c_cancels_the_job_and_keeps_finished_epochs(slurm, tmp_path):
    "SIGINT to a script waiting on a job: the job is cancelled (queue empty within 15 s), the Learner keeps its finished epochs."
    runs = tmp_path / 'runs'
    (tmp_path / 'train.py').write_text(SCRIPT.format(paths=[str(TESTS), str(helpers.REPO)], runs=str(runs)))
    p = subprocess.Popen([sys.executable, 'train.py'], cwd=tmp_path, env=helpers.subprocess_env(), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        folder = wait_for(lambda: next(iter(runs.glob('mpify-*')), None), 60, "no job was submitted")
        wait_for(lambda: checkpointed_epoch(folder) is not None, 120, "no epoch completed")
        t = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=60)
        assert_queue_empty(slurm, within=15 - (time.monotonic() - t))
    finally:
        if p.poll() is None: p.kill(); p.wait()
    out = helpers.strip_ansi(out)
    done = int(re.search(r'stopped with (\d+) of 8 epochs done \(epochs? 0(-\d+)?\); the Learner holds them', out).group(1))
    assert 1 <= done < 8 and f'ROWS {done}' in out and 'start_epoch=' in out, out

@pytest.mark.slow
@pytest.mark.parametrize('how', ['scontrol', 'usr2'])
def test_requeued_job_resumes_from_last_completed_epoch(executor, slurm, capsys, how):
    """Requeued mid-run, by `scontrol requeue` or by submitit's own checkpoint protocol (USR2, as before a time limit or
    a preemption): the job restarts from its last completed epoch, in the same table, and ends with every epoch's row."""
    from mpify_fastai.progress import BarStarted, EventLog, FitResumed, RowLogged, epochs_done
    learn = digits_learner()
    run = learn.ddp(executor=executor, wait=False).fit_one_cycle(4, LR, cbs=[SlowEpochs(2.0)])
    wait_for(lambda: checkpointed_epoch(run.folder) is not None, 180, "no epoch completed")
    if how == 'scontrol': slurm.run('scontrol', 'requeue', run.job_id)
    else: slurm.run('scancel', '--signal=USR2', run.job_id)   # rank 0's submitit handler calls checkpoint() and requeues
    start_again(slurm, run.job_id)
    run.wait()
    out = helpers.strip_ansi(capsys.readouterr().out)
    events = EventLog(run.folder / 'events.log').read()
    resumed = [e for e in events if isinstance(e, FitResumed)]
    assert len(resumed) == 1 and resumed[0].attempt == 1 and resumed[0].epoch >= 1, events
    k = resumed[0].epoch
    after = events[events.index(resumed[0]):]
    trained = [int(e.cells[0]) for e in after if isinstance(e, RowLogged) and len(e.cells) > 2]
    assert trained == list(range(k, 4)), f"the requeued job trained epochs {trained}, not only those after epoch {k - 1}"
    assert sum(isinstance(e, BarStarted) for e in after) == 2 * (4 - k)   # a training and a validation pass each
    assert f'was requeued (restart 1), with {epochs_done(k, 4)}: training from epoch {k}' in out, out
    table = [int(l.split()[0]) for l in out.splitlines() if re.match(r'\s*\d+\s+\d+\.\d{6}', l)]
    assert table == [0, 1, 2, 3], out
    assert len(rows(learn)) == 4

@pytest.mark.slow
@pytest.mark.parametrize('moment', ['first_epoch', 'last_epoch', 'last_epoch_end'])
def test_requeue_at_each_moment_resumes_from_the_last_completed_epoch(executor, slurm, capsys, tmp_path, moment):
    """`scontrol requeue` while rank 0 is held at `moment` of fit_one_cycle(3) (before the first epoch ends, in the last
    epoch, between the last epoch and the result): the requeued job goes on from the epoch after the last checkpointed one
    (0, 2, 3: it trains nothing), in the same table; every epoch trained once after it; 3 rows, the last = validate()."""
    from mpify_fastai.progress import EventLog, FitResumed, RowLogged, epochs_done
    from recovery_helpers import StopAt
    learn = digits_learner()
    run = learn.ddp(executor=executor, wait=False).fit_one_cycle(3, LR, cbs=[StopAt(str(tmp_path), moment, how='pause', rank=0)])
    wait_for(lambda: (tmp_path / 'stopped').exists(), 180, f"the job did not reach {moment}")
    requeue(slurm, run.job_id)
    run.wait()
    k = {'first_epoch': 0, 'last_epoch': 2, 'last_epoch_end': 3}[moment]
    events = EventLog(run.folder / 'events.log').read()
    resumed = [e for e in events if isinstance(e, FitResumed)]
    assert resumed == [FitResumed(k, 1)], events
    trained = [int(e.cells[0]) for e in events[events.index(resumed[0]):] if isinstance(e, RowLogged) and len(e.cells) > 2]
    assert trained == list(range(k, 3)), f"the requeued job trained epochs {trained}, not only those from epoch {k}"   # skipped epochs log short rows
    assert (tmp_path / 'epochs').read_text().splitlines() == [f'0 {e}' for e in range(min(k + 1, 3))] + [f'1 {e}' for e in range(k, 3)]
    out = helpers.strip_ansi(capsys.readouterr().out)
    assert f'was requeued (restart 1), with {epochs_done(k, 3)}: training from epoch {k}' in out, out
    assert [int(l.split()[0]) for l in out.splitlines() if re.match(r'\s*\d+\s+\d+\.\d{6}', l)] == [0, 1, 2], out
    got = rows(learn)
    with learn.no_bar(): val = [float(v) for v in learn.validate()]
    assert len(got) == 3 and all(abs(a - b) < 1e-5 for a, b in zip(got[-1][1:], val)), (got, val)
    assert not (run.folder / 'result.pth.ckpt').exists()

KERNEL_SUBMIT = '''
import submitit, mpify_fastai
from test_slurm import digits_learner
ex = submitit.AutoExecutor(folder={runs!r}, cluster="slurm")
ex.update_parameters(nodes=2, tasks_per_node=1, cpus_per_task=1, timeout_min=10, slurm_partition="test")
learn = digits_learner()
run = learn.ddp(executor=ex, wait=False).fit_one_cycle(2, 1e-2)
print("FOLDER", run.folder)
'''
KERNEL_ATTACH = '''
import mpify_fastai
from test_slurm import digits_learner
learn = digits_learner()
run = mpify_fastai.attach({runs!r}, learn)
run.wait()
n, last = len(learn.recorder.values), [float(v) for v in learn.recorder.values[-1]]   # before validate() replaces them
with learn.no_bar(): val = [float(v) for v in learn.validate()]
print("ROWS", n, "MATCH", all(abs(a - b) < 1e-5 for a, b in zip(last[1:], val)))
'''

def _execute(kc, code: str, timeout: float = 240) -> str:
    "Run `code` in the kernel; its stdout (an error fails the test)."
    msg_id, out = kc.execute(code), []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try: msg = kc.get_iopub_msg(timeout=1)
        except Exception: continue
        if msg['parent_header'].get('msg_id') != msg_id: continue
        c = msg['content']
        if msg['msg_type'] == 'stream': out.append(c['text'])
        elif msg['msg_type'] == 'error': raise AssertionError('\n'.join(c['traceback']))
        elif msg['msg_type'] == 'status' and c['execution_state'] == 'idle': return ''.join(out)
    raise AssertionError(f"the cell did not finish in {timeout} s: {''.join(out)}")

@pytest.mark.slow
def test_detach_restart_kernel_and_reattach(slurm, tmp_path):
    "`wait=False` returns at once; after a kernel restart `attach(folder, learn)` finds the run and `wait()` applies it."
    from jupyter_client import KernelManager
    runs = str(tmp_path / 'runs')
    km = KernelManager(kernel_name='python3')
    km.start_kernel(env=helpers.kernel_env(), cwd=str(tmp_path))
    kc = km.client(); kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        t = time.monotonic()
        out = _execute(kc, KERNEL_SUBMIT.format(runs=runs))
        assert 'FOLDER' in out and time.monotonic() - t < 30, out
        km.restart_kernel(now=True)
        kc.wait_for_ready(timeout=60)
        assert slurm.jobs(), "the job did not outlive the kernel"
        out = _execute(kc, KERNEL_ATTACH.format(runs=runs))
        assert 'ROWS 2 MATCH True' in out, out
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert_queue_empty(slurm, within=15)
