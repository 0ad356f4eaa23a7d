"""Fault campaign (issue 23): 40 runs of `learn.ddp(2).fit_one_cycle(6)` in one real kernel, each with one fault drawn at
random (seeded; `MPIFY_FAULT_SEED` overrides): (a) SIGKILL of a random rank, (b) a kernel interrupt, (c) an exception in a
random callback event on a random rank, (d) /dev/shm filled partway. The kernel runs in a private mount namespace with a
64 MB tmpfs on /dev/shm (Docker's default), so (d) can fill it and nothing else on the machine shares it.

After each run: the call returned or raised a documented error (a `LaunchError` subclass, or `KeyboardInterrupt`); the
Learner is untouched or holds exactly one completed epoch (weights equal to that epoch's, saved by a rank-0-only test
callback, as many recorder rows, `learn.epoch`); no process is left (the warm server aside); nothing of the call is left
in /dev/shm or the temp folder; and the next call succeeds. The table of outcomes per kind is printed and, with
`MPIFY_SOAK_REPORT=<file>`, appended to that file."""
from __future__ import annotations
import os, random, shutil, subprocess, time
from collections import Counter
import pytest
import helpers
from fault_cells import EVENTS, SETUP
from soak_kernel import Kernel

pytestmark = [pytest.mark.soak, pytest.mark.timeout(1500)]

RUNS, EPOCHS, SHM_MB = 40, 6, 64
KINDS = {'a': 'SIGKILL of a random rank', 'b': 'kernel interrupt (SIGINT)', 'c': 'exception in a callback event',
         'd': '/dev/shm filled partway'}

def _moment(rng: random.Random, clean: float) -> float:
    "A time in 0..1.1x a clean call's duration, half of the draws in 0.7..1.05x (the last epochs, result transfer and apply)."
    return rng.uniform(0, 1.1 * clean) if rng.random() < 0.5 else rng.uniform(0.7 * clean, 1.05 * clean)

def _workers(kernel: int) -> list[int]:
    "The ranks of the running call: children of the kernel's fork server."
    servers = [c['pid'] for c in helpers.children_of(kernel) if c['ppid'] == kernel and 'forkserver' in c['cmdline']]
    return [c['pid'] for s in servers for c in helpers.children_of(s) if c['ppid'] == s]

def _kill_a_rank(k: Kernel, folder: str, rank: int) -> str:
    "SIGKILL rank `rank` (its pid noted at before_fit), or any worker while the call is still launching."
    while k.until(time.monotonic() + 0.01):
        try: pid = int(open(f'{folder}/pid-{rank}').read())
        except (OSError, ValueError): pid = next(iter(_workers(k.pid)), None)
        if pid:
            helpers.kill_quietly([pid])
            return 'killed'
    return 'call over'

def _fill_shm(k: Kernel) -> str:
    "Fill the kernel's private /dev/shm (seen through /proc/<pid>/root) with one file, leaving no room."
    root = f'/proc/{k.pid}/root/dev/shm'
    st = os.statvfs(root)
    fd = os.open(f'{root}/filler', os.O_CREAT | os.O_WRONLY, 0o600)
    try: os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize)
    except OSError: pass
    finally: os.close(fd)
    return 'filled'

def _table(rows: list[tuple[str, str]]) -> str:
    counts = Counter(rows)
    lines = ['| fault kind | runs | outcome (error; what the Learner holds) |', '|---|---|---|']
    for kind, name in KINDS.items():
        outs = [f'{n}: {o}' for (kk, o), n in sorted(counts.items()) if kk == kind]
        lines.append(f"| ({kind}) {name} | {sum(n for (kk, _), n in counts.items() if kk == kind)} | {'; '.join(outs)} |")
    return '\n'.join(lines)

@pytest.fixture(scope='module')
def kernel(tmp_path_factory):
    if subprocess.run(['unshare', '-m', 'true'], capture_output=True).returncode != 0:
        pytest.skip('unshare -m is not permitted here (needs root)')
    k = Kernel(str(tmp_path_factory.mktemp('faults')), private_shm_mb=SHM_MB)
    yield k
    k.close()

def test_fault_campaign(kernel):
    k = kernel
    seed = int(os.environ.get('MPIFY_FAULT_SEED', random.randrange(10**6)))
    print(f'\nfault campaign seed: {seed} (MPIFY_FAULT_SEED={seed} repeats it)')
    rng = random.Random(seed)
    out = k.run(SETUP + "\nprint('RESULT ' + json.dumps(dict(folder=str(FOLDER))))")
    folder = k.results(out)[0]['folder']
    clean = []
    for i in range(3):   # the first warms the server; a clean call's duration is the shorter of the others'
        res = k.results(k.run(f'trial({-i - 1}, epochs={EPOCHS})'))[0]
        assert res['error'] is None and res['learner'] == f'epoch {EPOCHS - 1}', res
        clean.append(res['seconds'])
    T = min(clean[1:])
    print(f'clean call: {T:.2f} s')
    kinds = [kk for kk in KINDS for _ in range(RUNS // len(KINDS))]
    rng.shuffle(kinds)
    rows, failures, t_start = [], [], time.monotonic()
    for i, kind in enumerate(kinds):
        at, rank = _moment(rng, T), rng.randrange(2)
        raise_at = (rng.choice(EVENTS), rng.randrange(EPOCHS), rank) if kind == 'c' else None
        k.start(f'trial({i}, raise_at={raise_at!r}, epochs={EPOCHS})')
        t0 = k.wait_marker(f'START {i}')
        fault = 'raise' if kind == 'c' else 'call over'
        if kind != 'c' and k.until(t0 + at):
            fault = {'a': lambda: _kill_a_rank(k, f'{folder}/run-{i}', rank), 'b': lambda: (k.km.interrupt_kernel(), 'sent')[1],
                     'd': lambda: _fill_shm(k)}[kind]()
        text = k.finish(timeout=120)
        if kind == 'd' and os.path.exists(f'/proc/{k.pid}/root/dev/shm/filler'): os.unlink(f'/proc/{k.pid}/root/dev/shm/filler')
        res = (k.results(text) or [dict(error='no RESULT', learner='?')])[0]
        nxt = (k.results(k.run('next_call()', timeout=120)) or [{}])[0]
        desc = f"run {i} ({kind}, at {at:.2f} s, rank {rank}, {raise_at or ''} {fault}): {res}\nnext: {nxt}"
        if fault != 'raise' and (at > res.get('seconds', 0) or res.get('late_interrupt')): fault = 'call over'
        print(f"run {i} ({kind}, {f'raise in {raise_at}' if raise_at else f'{fault} at {at:.2f} s'}): {res['error'] or 'returned'} after "
              f"{res.get('seconds', 0):.2f} s, Learner {res['learner']}")
        problems = [p for p, bad in [
            ('undocumented error', res['error'] is not None and not res.get('documented')),
            ('a raised callback did not fail the call', kind == 'c' and res['error'] != 'WorkerError'),
            ('Learner neither untouched nor one completed epoch', not res['learner'].startswith(('untouched', 'epoch'))),
            ('kept checkpoint is not its epoch', res.get('kept_ok') is False),
            ('processes left', bool(res.get('procs'))), ('/dev/shm entries left', bool(res.get('shm'))),
            ('temp folders left', bool(res.get('tmp'))),
            ('next call failed', not (nxt.get('next_ok') and not nxt['procs'] and not nxt['shm'] and not nxt['tmp']))] if bad]
        if problems: failures.append(f'{problems}: {desc}\n{text[-2500:]}')
        learner = 'untouched' if res['learner'] == 'untouched' else 'all 6 epochs' if res['learner'] == f'epoch {EPOCHS - 1}' else \
            'an earlier epoch' if res['learner'].startswith('epoch') else res['learner']
        when = ' (fault after the call)' if fault == 'call over' else ' (interrupt while applied)' if 'result was applied' in text else ''
        rows.append((kind, f"{res['error'] or 'returned'}, {learner}{when}"))
    shutil.rmtree(folder, ignore_errors=True)
    table = _table(rows)
    print(f'\nseed {seed}, {RUNS} runs in {time.monotonic() - t_start:.0f} s, clean call {T:.2f} s\n{table}')
    if os.environ.get('MPIFY_SOAK_REPORT'):
        with open(os.environ['MPIFY_SOAK_REPORT'], 'a') as f: f.write(f'\nseed {seed}, clean call {T:.2f} s\n{table}\n')
    assert not failures, f'seed {seed}: {len(failures)} of {RUNS} runs went wrong:\n\n' + '\n\n'.join(failures)
