"""Soak (issue 23): in ONE real Jupyter kernel, 100 `learn.fit_ddp(1)` calls on the digits Learner (progress on) and
300 `ranch` calls, then the same again with the warm server stopped (`stop_warm_server()`) every 10 calls.

After every call: no worker left, no `mpify-<kernel pid>-*` entry in /dev/shm or the temp folder, no /dev/shm file held
by the kernel. Every 10 calls the kernel samples its RSS, open fds and threads. Bounds, from the 20th call of a phase
on (the first calls import, start the server and fill caches): RSS grows by less than `RSS_MB` (fit_ddp) or
`RSS_MB_RANCH` (ranch); fds and threads never exceed their value at the 20th call by more than `SLACK` (a helper thread
or its pipe that comes and goes). The figures print as a table; `MPIFY_SOAK_REPORT=<file>` appends them there."""
from __future__ import annotations
import json, os
import pytest
import helpers

pytestmark = [pytest.mark.soak, pytest.mark.timeout(3000)]

RSS_MB, RSS_MB_RANCH, SLACK = 20, 10, 2

SETUP = r'''
import glob, json, os, re, tempfile, time, torch
from fastai.basics import *
import mpify_fastai, helpers
from mpify_fastai import ranch
from mpify_fastai.warm import stop_warm_server
from mpify_fastai.demo import digits_dls, digits_cnn
learn = Learner(digits_dls(), digits_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
def work(t): return t * int(os.environ['RANK'])   # a notebook function, a tensor in and out

def left() -> list:
    "What one call left behind: workers, scratch entries of this kernel, /dev/shm files it holds."
    me = os.getpid()
    return ([c['cmdline'][:60] for c in helpers.leftover_processes(grace=5)] + glob.glob(f'/dev/shm/mpify-{me}-*')
            + glob.glob(f'{tempfile.gettempdir()}/mpify-{me}-*') + sorted(helpers.shm_files_held(me)))

def sample(phase, calls, t0) -> dict:
    s = open('/proc/self/status').read()
    me = os.getpid()
    return dict(phase=phase, calls=calls, seconds=round(time.monotonic() - t0, 1),
                rss_mb=round(int(re.search(r'VmRSS:\s+(\d+)', s).group(1)) / 1024, 1),
                fds=len(os.listdir('/proc/self/fd')), threads=int(re.search(r'Threads:\s+(\d+)', s).group(1)),
                shm=len(glob.glob(f'/dev/shm/mpify-{me}-*')) + len(helpers.shm_files_held(me)),
                tmp=len(glob.glob(f'{tempfile.gettempdir()}/mpify-{me}-*')))

def soak(phase, n, call, restart_every=None):
    "`n` calls, each checked for leftovers; a sample every 10 (RESULT lines)."
    t0 = time.monotonic()
    for i in range(1, n + 1):
        if restart_every and i % restart_every == 1 and i > 1: stop_warm_server()
        call()
        if (bad := left()): raise AssertionError(f'call {i} of {phase} left {bad}')
        if i % 10 == 0: print('RESULT ' + json.dumps(sample(phase, i, t0)), flush=True)
'''

PHASES = [("fit_ddp", 100, "lambda: learn.fit_ddp(1, 1e-2, nprocs=2)", None),
          ("ranch", 300, "lambda: ranch(2, work, torch.ones(1000))", None),
          ("fit_ddp + restarts", 100, "lambda: learn.fit_ddp(1, 1e-2, nprocs=2)", 10),
          ("ranch + restarts", 300, "lambda: ranch(2, work, torch.ones(1000))", 10)]

def _samples(cell) -> list[dict]:
    assert not helpers.cell_errors(cell), helpers.cell_output(cell)[-4000:]
    return [json.loads(l[7:]) for l in helpers.cell_output(cell, 'stdout').splitlines() if l.startswith('RESULT ')]

@pytest.fixture(scope='module')
def phases(tmp_path_factory):
    "The executed notebook: one setup cell, then one cell per phase; its samples by phase."
    cells = [SETUP] + [f'soak({name!r}, {n}, {call}, {every})' for name, n, call, every in PHASES]
    nb = helpers.run_notebook(cells, timeout=1200, allow_errors=True, cwd=str(tmp_path_factory.mktemp('soak')))
    assert not helpers.cell_errors(nb.cells[0]), helpers.cell_output(nb.cells[0])[-4000:]
    out = {name: cell for (name, *_), cell in zip(PHASES, nb.cells[1:])}
    table = ['| phase | calls | s | RSS MB | fds | threads | shm | tmp |', '|---|---|---|---|---|---|---|---|']
    for name, cell in out.items():
        try: table += [f"| {s['phase']} | {s['calls']} | {s['seconds']} | {s['rss_mb']} | {s['fds']} | {s['threads']} | "
                       f"{s['shm']} | {s['tmp']} |" for s in _samples(cell)]
        except AssertionError: table.append(f'| {name} | failed | | | | | | |')
    print('\n' + '\n'.join(table))
    if os.environ.get('MPIFY_SOAK_REPORT'):
        with open(os.environ['MPIFY_SOAK_REPORT'], 'a') as f: f.write('\n'.join(table) + '\n')
    return out

@pytest.mark.parametrize('phase', [p[0] for p in PHASES])
def test_soak_is_flat(phases, phase):
    s = _samples(phases[phase])
    n = dict((p[0], p[1]) for p in PHASES)[phase]
    assert [x['calls'] for x in s] == list(range(10, n + 1, 10))
    base = next(x for x in s if x['calls'] == 20)
    later = [x for x in s if x['calls'] >= 20]
    bound = RSS_MB_RANCH if phase.startswith('ranch') else RSS_MB
    assert max(x['rss_mb'] for x in later) - base['rss_mb'] < bound, s
    assert max(x['fds'] for x in later) <= base['fds'] + SLACK, s
    assert max(x['threads'] for x in later) <= base['threads'] + SLACK, s
    assert all(x['shm'] == 0 and x['tmp'] == 0 for x in s), s
