"""Process tests of `ranch`: real worker processes, real signals, /proc inspection afterwards.

Every test here runs under the `no_leftovers` fixture: when it ends, no descendant of this process may remain
(zombies count) and no /dev/shm/mpify-* scratch may be left behind.
"""
import contextlib, ctypes, os, signal, subprocess, sys, time
import multiprocess as mp
import pytest
import helpers
from helpers import (Boom, chatter, delayed_rank, echo, fail_on, rank_env, rng_draws, sleep_forever, square_rank,
                     touch_rank)
from mpify_fastai import (ImportsError, LaunchError, LaunchTimeout, PayloadError, TorchDDPCtx, WorkerDied, WorkerError,
                          in_torchddp, ranch, send_event)
from mpify_fastai.launch import launch

pytestmark = pytest.mark.usefixtures('no_leftovers')

def _gone(pid) -> bool: return not helpers.alive(int(pid))

def _assert_next_call_works(**kw):
    assert ranch(2, square_rank, 5, **kw) == [5, 6]

# ---------------------------------------------------------------- results, env, gather

def test_results_in_rank_order():
    # rank 0 finishes last, rank 2 first: the list is still in rank order
    assert ranch(3, delayed_rank, [0.6, 0.3, 0.0]) == [0, 1, 2]

def test_args_and_kwargs_reach_every_rank():
    assert ranch(2, echo, 1, 'a', k={'x': [1, 2]}) == [(0, (1, 'a'), {'k': {'x': [1, 2]}}),
                                                        (1, (1, 'a'), {'k': {'x': [1, 2]}})]

def test_single_process():
    assert ranch(1, rank_env) == [dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', LOCAL_WORLD_SIZE='1')]

def test_rank_env_in_workers_and_caller_environ_unchanged(monkeypatch):
    monkeypatch.setenv('RANK', '99')          # a caller that has its own values must keep them
    monkeypatch.setenv('WORLD_SIZE', '7')
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    before = dict(os.environ)
    res = ranch(2, rank_env)
    assert res == [dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='2', LOCAL_WORLD_SIZE='2'),
                   dict(RANK='1', LOCAL_RANK='1', WORLD_SIZE='2', LOCAL_WORLD_SIZE='2')]
    assert dict(os.environ) == before

def test_gather_one_rank(tmp_path):
    assert ranch(2, touch_rank, str(tmp_path), gather=0) == 'result of rank 0'
    assert ranch(2, touch_rank, str(tmp_path), gather=1) == 'result of rank 1'

def test_gather_none_runs_every_rank_returns_nothing(tmp_path):
    assert ranch(2, touch_rank, str(tmp_path), gather=None) is None
    pids = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert set(pids) == {'ran-0', 'ran-1'} and len(set(pids.values())) == 2 and str(os.getpid()) not in pids.values()

@pytest.mark.parametrize('method', ['spawn', 'fork', 'forkserver'])
def test_other_start_methods(method):
    assert ranch(2, rank_env, start_method=method) == [
        dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='2', LOCAL_WORLD_SIZE='2'),
        dict(RANK='1', LOCAL_RANK='1', WORLD_SIZE='2', LOCAL_WORLD_SIZE='2')]

def test_forkserver_workers_see_the_callers_current_environ(monkeypatch):
    "The forkserver was started earlier, with the environment of that time: workers must get the caller's now."
    monkeypatch.setenv('MPIFY_TEST_GONE', 'old')
    monkeypatch.delenv('MPIFY_TEST_NEW', raising=False)
    assert ranch(1, helpers.env_of, 'MPIFY_TEST_GONE', 'MPIFY_TEST_NEW', start_method='forkserver') == [
        {'MPIFY_TEST_GONE': 'old', 'MPIFY_TEST_NEW': None}]
    monkeypatch.setenv('MPIFY_TEST_NEW', 'new')
    monkeypatch.delenv('MPIFY_TEST_GONE')
    assert ranch(2, helpers.env_of, 'MPIFY_TEST_GONE', 'MPIFY_TEST_NEW', 'RANK', start_method='forkserver') == [
        {'MPIFY_TEST_GONE': None, 'MPIFY_TEST_NEW': 'new', 'RANK': '0'},
        {'MPIFY_TEST_GONE': None, 'MPIFY_TEST_NEW': 'new', 'RANK': '1'}]

def test_launch_events_output_and_env():
    events, outs = [], []
    res = launch(2, helpers.eventful, (3,), env=lambda r: {'MPIFY_TEST_X': f'x{r}'},
                 on_event=lambda r, *data: events.append((r, *data)), on_output=lambda *a: outs.append(a))
    assert res == ['x0', 'x1'] and 'MPIFY_TEST_X' not in os.environ
    for r in (0, 1):
        assert [e for e in events if e[0] == r] == [(r, 'step', r, i) for i in range(3)]
    assert sorted(outs) == [(0, 'stdout', 'done 0'), (1, 'stdout', 'done 1')]   # on_output sees every rank
    assert launch(2, helpers.env_of, ('MPIFY_TEST_X',), env={'MPIFY_TEST_X': 'same'}) == [{'MPIFY_TEST_X': 'same'}] * 2

def test_send_event_outside_a_worker():
    with pytest.raises(RuntimeError, match='only inside a worker'):
        send_event('nope')

def test_imports_that_fail_in_the_worker():
    with pytest.raises(WorkerError) as ei:
        ranch(2, echo, imports='import no_such_module_mpify_xyz')
    assert ei.value.exc_type == 'ModuleNotFoundError' and 'no_such_module_mpify_xyz' in str(ei.value)
    assert type(ei.value.__cause__) is ModuleNotFoundError

# ---------------------------------------------------------------- notebook-style code in __main__

NB = '''
SCALE = 10
def nb_fn(x):
    return Fraction(x + int(os.environ['RANK']), SCALE) + globals()['HIDDEN']
'''

def test_main_function_with_need_and_imports(main_ns):
    ns = main_ns(NB + 'HIDDEN = 100\n')
    assert 'Fraction' not in ns and 'os' not in ns     # only the workers get them, through imports=
    from fractions import Fraction
    res = ranch(2, ns['nb_fn'], 3, need='HIDDEN', imports='from fractions import Fraction\nimport os')
    assert res == [Fraction(3, 10) + 100, Fraction(4, 10) + 100]
    assert 'Fraction' not in ns and 'os' not in ns     # run_imports left the caller's namespace alone

def test_main_function_without_need_fails_in_worker(main_ns):
    "Negative control for the test above: HIDDEN is reached only through globals(), so only need= ships it."
    ns = main_ns(NB + 'HIDDEN = 100\n')
    with pytest.raises(WorkerError) as ei:
        ranch(2, ns['nb_fn'], 3, imports='from fractions import Fraction\nimport os')
    assert type(ei.value.__cause__) is KeyError and "'HIDDEN'" in str(ei.value)

def test_notebook_class_instance_comes_home_as_the_notebook_class(main_ns):
    "An instance of a notebook class, passed through a function that never names the class, is still of that class."
    ns = main_ns("class Box:\n    def __init__(self, v): self.v = v\ndef ident(x): return x\n")
    out = ranch(2, ns['ident'], ns['Box'](3))
    assert [type(o) is ns['Box'] for o in out] == [True, True] and [o.v for o in out] == [3, 3]

def test_workers_rngs_differ_per_rank_and_call_and_follow_the_callers_seed():
    """Every worker forked from the warm server would start from the server's RNG state: the same draws in every call
    (the same epoch order in every fit_ddp). They are seeded from the caller's RNG instead: Python's, and numpy's and
    torch's where the worker has them at the start (a tensor in the call, as in every fastai call)."""
    import random, torch
    with_torch = torch.zeros(1)
    first, second = ranch(2, rng_draws, with_torch), ranch(2, rng_draws, with_torch)
    assert len({d for ranks in (first, second) for draws in ranks for d in draws}) == 12, (first, second)
    random.seed(5); torch.manual_seed(5)
    a = ranch(2, rng_draws, with_torch)
    random.seed(5); torch.manual_seed(5)
    assert ranch(2, rng_draws, with_torch) == a

# ---------------------------------------------------------------- failures

def _fail(how, tmp_path, **kw):
    """Run 2 ranks where rank 1 fails `how` and rank 0 sleeps 60 s; return (exception, seconds from rank 1's
    failure to the exception, rank-0 pid). Rank 1 fails 0.3 s after writing its pid file."""
    t = time.monotonic()
    with pytest.raises(LaunchError) as ei:
        ranch(2, fail_on, 1, how, str(tmp_path), **kw)
    end, took = time.time(), time.monotonic() - t
    assert took < 15, f"the whole call took {took:.1f} s"
    since_failure = end - (os.stat(tmp_path / 'pid-1').st_mtime + 0.3)
    pid0 = int((tmp_path / 'pid-0').read_text())
    return ei.value, since_failure, pid0

def _check_stopped(took, pid0):
    assert took < 5, f"took {took:.1f} s to report a failure while rank 0 sleeps 60 s"
    assert _gone(pid0), f"rank 0 (pid {pid0}) still alive: {helpers.proc_state(pid0)}"
    assert helpers.proc_state(pid0) is None, "rank 0 was not reaped (zombie)"

def test_worker_exception(tmp_path):
    e, took, pid0 = _fail('raise', tmp_path)
    assert type(e) is WorkerError and e.rank == 1 and e.exc_type == 'ValueError'
    msg = str(e)
    assert msg.startswith('rank 1 raised ValueError: bad value on rank 1')
    assert '--- traceback from rank 1 ---' in msg and 'Traceback (most recent call last)' in msg
    assert 'in fail_on' in msg and 'raise ValueError(f"bad value on rank {r}")' in msg   # the remote traceback
    assert msg.rstrip().endswith('ValueError: bad value on rank 1')
    assert type(e.__cause__) is ValueError and e.__cause__.args == ('bad value on rank 1',)
    _check_stopped(took, pid0)
    _assert_next_call_works()

def test_worker_custom_exception_is_the_cause(tmp_path):
    e, took, pid0 = _fail('boom', tmp_path)
    assert type(e) is WorkerError and 'rank 1 raised Boom: ' in str(e)
    assert type(e.__cause__) is Boom and e.__cause__.args == ('custom failure', 1)
    _check_stopped(took, pid0)

def test_worker_exception_that_cannot_be_pickled(tmp_path):
    e, took, pid0 = _fail('badexc', tmp_path)
    assert type(e) is WorkerError and str(e).startswith('rank 1 raised RuntimeError: carries a generator')
    assert 'raise e' in e.remote_traceback and e.__cause__ is None
    _check_stopped(took, pid0)

def test_worker_result_that_cannot_be_pickled(tmp_path):
    e, took, pid0 = _fail('unpicklable_result', tmp_path)
    assert type(e) is WorkerError and e.rank == 1 and 'generator' in str(e)
    _check_stopped(took, pid0)

def test_worker_killed_by_sigkill(tmp_path):
    e, took, pid0 = _fail('sigkill', tmp_path)
    assert type(e) is WorkerDied and e.rank == 1 and e.exitcode == -signal.SIGKILL
    assert 'rank 1' in str(e) and 'SIGKILL' in str(e)
    _check_stopped(took, pid0)
    _assert_next_call_works()

def test_worker_os_exit(tmp_path):
    e, took, pid0 = _fail('exit3', tmp_path)
    assert type(e) is WorkerDied and e.rank == 1 and e.exitcode == 3
    assert 'rank 1' in str(e) and 'code 3' in str(e)
    _check_stopped(took, pid0)
    _assert_next_call_works()

@pytest.mark.parametrize('method,how,exc', [('spawn', 'raise', WorkerError), ('spawn', 'sigkill', WorkerDied),
                                            ('fork', 'raise', WorkerError), ('forkserver', 'sigkill', WorkerDied)])
def test_failure_with_other_start_methods(tmp_path, method, how, exc):
    e, took, pid0 = _fail(how, tmp_path, start_method=method)
    assert type(e) is exc and e.rank == 1
    _check_stopped(took, pid0)
    _assert_next_call_works(start_method=method)

def test_launch_errors_pickle():
    import pickle
    for e in [WorkerError(1, 'ValueError', 'bad\nvalue', 'Traceback ...'), WorkerDied(2, -9),
              WorkerDied(0, 3), LaunchTimeout('late'), PayloadError('cannot')]:
        e2 = pickle.loads(pickle.dumps(e))
        assert type(e2) is type(e) and str(e2) == str(e) and e2.__dict__ == e.__dict__

def test_nested_launch_error_keeps_its_cause():
    "A worker that itself calls ranch: the inner WorkerError travels back as the outer one's __cause__."
    with pytest.raises(WorkerError) as ei:
        ranch(1, helpers.nested_launch)
    e = ei.value
    assert e.rank == 0 and e.exc_type == 'WorkerError' and 'rank 1 raised ValueError: bad value on rank 1' in str(e)
    assert type(e.__cause__) is WorkerError and e.__cause__.rank == 1 and e.__cause__.exc_type == 'ValueError'

def test_timeout(tmp_path):
    t = time.monotonic()
    with pytest.raises(LaunchTimeout) as ei:
        ranch(2, sleep_forever, str(tmp_path), timeout=1.5)
    took = time.monotonic() - t
    assert isinstance(ei.value, TimeoutError) and 'timeout=1.5' in str(ei.value)
    assert 1.5 <= took < 10, took      # not the 60 s the workers would sleep
    for p in tmp_path.iterdir():
        assert helpers.proc_state(int(p.read_text())) is None
    _assert_next_call_works()

# ---------------------------------------------------------------- bad input: errors before any process starts

class _Holder:
    pass

def _with_generator():
    learn = _Holder()
    learn.dls = _Holder()
    learn.dls.after_item = (i for i in range(3))
    return learn

BAD_CALLS = {
    'nprocs=0': (lambda: ranch(0, echo), ValueError, 'nprocs must be a positive int, got 0'),
    'nprocs=-1': (lambda: ranch(-1, echo), ValueError, 'got -1'),
    'nprocs=1.5': (lambda: ranch(1.5, echo), ValueError, 'got 1.5'),
    'nprocs=True': (lambda: ranch(True, echo), ValueError, 'got True'),
    'nprocs="2"': (lambda: ranch('2', echo), ValueError, "got '2'"),
    'fn not callable': (lambda: ranch(2, 42), TypeError, 'fn must be callable, got int'),
    'unknown need': (lambda: ranch(2, echo, need='no_such_global_xyz'), NameError, "'no_such_global_xyz'"),
    'imports not imports': (lambda: ranch(2, echo, imports='import os\nos.remove("x")'), ImportsError, 'line 2'),
    'imports syntax': (lambda: ranch(2, echo, imports='from os import ('), ImportsError, 'syntax error'),
    'imports relative': (lambda: ranch(2, echo, imports='from . import x'), ImportsError, 'relative'),
    'unpicklable arg': (lambda: ranch(2, echo, 1, _with_generator()), PayloadError, 'args[1].dls.after_item: <generator>'),
    'unpicklable kwarg': (lambda: ranch(2, echo, data=(i for i in ())), PayloadError, "kwargs['data']: <generator>"),
    'bad start_method': (lambda: ranch(2, echo, start_method='thread'), ValueError, "start_method must be one of"),
    'gather=2': (lambda: ranch(2, echo, gather=2), ValueError, 'gather must be'),
    'gather=-1': (lambda: ranch(2, echo, gather=-1), ValueError, 'gather must be'),
    'gather="first"': (lambda: ranch(2, echo, gather='first'), ValueError, 'gather must be'),
    'bad output': (lambda: ranch(2, echo, output='loud'), ValueError, 'output must be one of'),
    'timeout=0': (lambda: ranch(2, echo, timeout=0), ValueError, 'timeout must be'),
    'caller_rank=0': (lambda: ranch(2, echo, caller_rank=0), ValueError, 'caller_rank=0: the caller never runs a rank'),
    'ctx not a context': (lambda: ranch(2, echo, ctx=42), TypeError, 'ctx must be a context manager'),
    'ctx a running generator': (lambda: ranch(2, echo, ctx=_generator_context()), TypeError, 'ctx=my_context, not'),
    'in_torchddp caller_rank': (lambda: in_torchddp(2, echo, caller_rank=0), ValueError, 'use gather=0'),
    'in_torchddp world_size': (lambda: in_torchddp(2, echo, world_size=4), ValueError, 'world_size=4 but 2 processes'),
    'in_torchddp base_rank': (lambda: in_torchddp(2, echo, base_rank=2), ValueError, 'run it under torchrun'),
    'TorchDDPCtx addr': (lambda: ranch(2, echo, ctx=TorchDDPCtx(addr='10.0.0.1')), ValueError, 'nothing listens'),
    'TorchDDPCtx world_size': (lambda: ranch(2, echo, ctx=TorchDDPCtx(world_size=3)), ValueError, 'world_size=3 but 2'),
    'both backend and ctx': (lambda: in_torchddp(2, echo, backend='gloo', ctx=TorchDDPCtx()), ValueError, 'not both'),
}

@contextlib.contextmanager
def _generator_context(): yield

@pytest.mark.parametrize('case', list(BAD_CALLS))
def test_bad_input_fails_before_any_process_starts(case):
    call, exc, text = BAD_CALLS[case]
    counter = mp.process._process_counter
    before_count, before_shm = repr(counter), helpers.shm_entries()
    before_kids = [c['pid'] for c in helpers.children_of()]
    with pytest.raises(exc) as ei:
        call()
    assert text in str(ei.value)
    assert repr(counter) == before_count, "a worker Process was created before the input was checked"
    assert [c['pid'] for c in helpers.children_of()] == before_kids   # no server or helper started either
    assert helpers.shm_entries() == before_shm

def test_unpicklable_notebook_global_is_named(main_ns):
    "A global the function uses (shipped automatically) that cannot be pickled: the message names the global."
    ns = main_ns('def uses_learn():\n    return learn.dls\n')
    ns['learn'] = _with_generator()
    counter = mp.process._process_counter
    before = repr(counter)
    with pytest.raises(PayloadError) as ei:
        ranch(2, ns['uses_learn'])
    assert 'global learn.dls.after_item: <generator>' in str(ei.value)
    ns = main_ns('class Model:\n    def feed(self): return next(STREAM)\ndef uses_model():\n    return Model()\n')
    ns['STREAM'] = (i for i in range(3))      # reached only through a method of a notebook class
    with pytest.raises(PayloadError, match='global STREAM: <generator>'):
        ranch(2, ns['uses_model'])
    assert repr(counter) == before

def test_process_counter_detects_a_launch():
    "Control for the test above: a real launch does move the counter it watches."
    counter = mp.process._process_counter
    before = repr(counter)
    ranch(1, echo)
    assert repr(counter) != before

# ---------------------------------------------------------------- output relay

def test_output_rank0_by_default(capsys):
    assert ranch(2, chatter, 2) == ['0', '1']
    out, err = capsys.readouterr()
    assert out.splitlines() == ['out 0 line 0', 'out 0 line 1', 'tail 0']
    assert sorted(err.splitlines()) == ['[rank 1] err 1', 'err 0']

def test_output_all_prefixes_other_ranks(capsys):
    ranch(2, chatter, 1, output='all')
    out, err = capsys.readouterr()
    assert sorted(out.splitlines()) == ['[rank 1] out 1 line 0', '[rank 1] tail 1', 'out 0 line 0', 'tail 0']
    assert sorted(err.splitlines()) == ['[rank 1] err 1', 'err 0']

def test_output_none(capsys):
    ranch(2, chatter, 1, output='none')
    out, err = capsys.readouterr()
    assert out == '' and err == ''

# ---------------------------------------------------------------- tensors through workers

def test_tensor_payload_through_workers():
    "The 1797-views dataset reaches 2 workers through one segment file; their writes never reach the caller."
    import torch
    torch.manual_seed(0)
    X = torch.randn(1797, 64)
    y = torch.randint(0, 10, (1797,))
    ds = [(X[i], y[i]) for i in range(len(X))]
    keep = X.clone()
    res = ranch(2, helpers.torch_views_job, ds, X)
    assert torch.equal(X, keep)
    total = float(sum(float(x.sum()) for x, _ in ds))
    for r, d in enumerate(res):
        assert d['rank'] == r and d['n'] == 1797 and d['views_share_storage']
        assert d['children'] == [], d['children']     # no torch_shm_manager (or anything else) in the worker
        assert d['total'] == pytest.approx(total, rel=1e-4, abs=1e-2)
        assert d['x_first'] == -5.0      # X and the views share their storage in the worker too
        assert torch.equal(d['big'], torch.full((300, 300), float(r)))
        assert type(d['param']) is torch.nn.Parameter and d['param'].requires_grad
    pids = {d['pid'] for d in res}
    assert [p for p in helpers.shm_entries() if helpers.owner_pid(p) in pids] == []   # no torch_<pid>_* files
    res[0]['big'].add_(1)                 # results are private, writable copies
    assert res[1]['big'][0, 0].item() == 1.0

# ---------------------------------------------------------------- the caller dies or is interrupted

CALLER = '''
import sys
from mpify_fastai import ranch
from helpers import children_of, mp_helper_pids

def sleeper(folder, stubborn=False):
    import os, signal, time
    if stubborn and os.environ['RANK'] == '1': signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(os.path.join(folder, 'pid-' + os.environ['RANK']), 'w') as f: f.write(str(os.getpid()))
    time.sleep(60)
    return 'woke up'

if __name__ == "__main__":
    folder, method, stubborn = sys.argv[1], sys.argv[2], sys.argv[3:] == ['stubborn']
    kw = {} if method == 'default' else {'start_method': method}
    try:
        ranch(2, sleeper, folder, stubborn, **kw)
    except KeyboardInterrupt:
        kept = mp_helper_pids()   # the fork server and resource tracker stay on purpose
        left = [(c['pid'], c['cmdline']) for c in children_of() if c['pid'] not in kept]
        print('KeyboardInterrupt raised; left:', left, flush=True)
        sys.exit(0)
    print('ranch returned', flush=True)
    sys.exit(1)
'''

PR_SET_CHILD_SUBREAPER = 36

def _set_subreaper(on: bool):
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)

def _start_caller(tmp_path, method='default', new_session=False, *extra):
    script = tmp_path / 'caller.py'
    script.write_text(CALLER)
    folder = tmp_path / 'pids'
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, str(script), str(folder), method, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=helpers.subprocess_env(), cwd=str(tmp_path),
                            start_new_session=new_session)
    pids = [int(s) for s in helpers.wait_for_files([folder / 'pid-0', folder / 'pid-1'], timeout=60, proc=proc)]
    return proc, pids

@pytest.mark.parametrize('method', ['default', 'spawn', 'forkserver'])
def test_caller_killed_takes_workers_along(tmp_path, method):
    """kill -9 the caller while its workers sleep: they must be gone within 10 s, and the /dev/shm memory of the call
    freed with them. Linux re-parents orphans to
    init, which here does not reap; this test makes itself the subreaper so it can see them exit and reap them."""
    before = {c['pid'] for c in helpers.children_of()}
    _set_subreaper(True)
    try:
        proc, pids = _start_caller(tmp_path, method)
        assert all(helpers.alive(p) for p in pids)
        held = helpers.shm_files_held(proc.pid)
        assert held and all(f.endswith('(deleted)') for f in held), held   # the call's data: /dev/shm files with no name
        assert helpers.scratch_of(proc.pid) == []
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline, gone = time.monotonic() + 10, set()
        while time.monotonic() < deadline and len(gone) < len(pids):
            for p in pids:
                if p not in gone and helpers.proc_state(p) in (None, 'Z'): gone.add(p)
            time.sleep(0.05)
        assert gone == set(pids), f"workers still alive 10 s after the caller died: " \
                                  f"{[(p, helpers.proc_state(p)) for p in pids if p not in gone]}"
    finally:
        _set_subreaper(False)
        adopted = [c['pid'] for c in helpers.children_of() if c['pid'] not in before and c['ppid'] == os.getpid()]
        helpers.kill_quietly(p for p in adopted if helpers.alive(p))
        for p in adopted:   # reap the orphans (workers, forkserver, resource tracker) we adopted
            try: os.waitpid(p, 0)
            except ChildProcessError: pass
    # with its caller and workers gone, nothing of the call is left in /dev/shm, without waiting for another call
    assert helpers.shm_holders(held) == [] and helpers.scratch_of(proc.pid) == []
    _assert_next_call_works()

@pytest.mark.parametrize('target,method', [('pid', 'default'), ('group', 'default'), ('group', 'spawn')])
def test_keyboard_interrupt_in_caller(tmp_path, target, method):
    """SIGINT to the caller alone (a Jupyter kernel interrupt) or to its whole process group (Ctrl-C in a
    terminal): the caller raises KeyboardInterrupt, and stops its workers itself, quietly."""
    proc, pids = _start_caller(tmp_path, method, new_session=target == 'group')
    time.sleep(0.2)
    t = time.monotonic()
    if target == 'pid': os.kill(proc.pid, signal.SIGINT)
    else: os.killpg(proc.pid, signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=15)
    finally:
        helpers.kill_quietly([proc.pid] + [p for p in pids if helpers.alive(p)])
    took = time.monotonic() - t
    assert out.strip() == 'KeyboardInterrupt raised; left: []', (out, err)
    assert proc.returncode == 0 and took < 5
    assert [helpers.proc_state(p) for p in pids] == [None, None]
    assert 'Traceback' not in err, err    # workers were not interrupted into printing tracebacks
    assert 'where each was' not in err and 'Thread 0x' not in err, err   # stopped within the grace: no stacks
    assert helpers.scratch_of(proc.pid) == []

def test_interrupt_shows_stacks_of_a_rank_that_does_not_stop(tmp_path):
    "A rank that ignores SIGTERM outlasts the grace after Ctrl-C: every live rank's stack is printed, then it is killed."
    proc, pids = _start_caller(tmp_path, 'default', False, 'stubborn')
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGINT)
    try: out, err = proc.communicate(timeout=15)
    finally: helpers.kill_quietly([proc.pid] + [p for p in pids if helpers.alive(p)])
    assert out.strip() == 'KeyboardInterrupt raised; left: []', (out, err)
    assert 'a rank did not stop within' in err and '--- where rank 1 was ---' in err and 'in sleeper' in err, err
    assert [helpers.proc_state(p) for p in pids] == [None, None]
