"""Benchmark suite of mpify_fastai against its peers, side by side in one run: `python bench/run.py [--quick]`.

Writes bench/RESULTS.md (a table of figure, ours, peer, ratio, machine; the method; the raw numbers).
Peers that are not project dependencies (accelerate) go into the bench's own environment, bench/.venv: it is
created from the interpreter that runs this script (its packages stay visible through a `.pth` file, because
`--system-site-packages` would expose the base Python's packages, not those of a virtualenv running this), and
the script re-executes itself there. Every measurement runs in a fresh notebook-like child interpreter
(`python -c`, so `__main__` has no file), one at a time; the tasks live in bench_workers.py.
"""
from __future__ import annotations
import argparse, json, os, platform, signal, site, statistics, subprocess, sys, sysconfig, tempfile, time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV = BENCH / '.venv'
RESULTS = BENCH / 'RESULTS.md'
PEERS = ('accelerate',)
MB = 1 << 20

# ---------------------------------------------------------------- the bench's own environment

def _venv_python() -> Path: return VENV / 'bin' / 'python'

def _in_bench_env() -> bool: return Path(sys.prefix).resolve() == VENV.resolve()

def _parent_sites() -> list[str]:
    "Site-packages folders of the interpreter running this script (a virtualenv's own included)."
    return list(dict.fromkeys([sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib'], *site.getsitepackages()]))

def _make_env() -> None:
    "Create bench/.venv on top of this interpreter's packages and install the peers into it."
    print(f"creating {VENV} (peers: {', '.join(PEERS)})", flush=True)
    subprocess.check_call([sys.executable, '-m', 'venv', '--clear', str(VENV)])
    purelib = subprocess.check_output([str(_venv_python()), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                                      text=True).strip()
    lines = [f'import site; site.addsitedir({p!r})' for p in _parent_sites()]   # addsitedir: their .pth files (editable installs) count too
    Path(purelib, '_bench_parent_env.pth').write_text('\n'.join(lines) + '\n')
    subprocess.check_call([str(_venv_python()), '-m', 'pip', 'install', '-q', '--disable-pip-version-check', *PEERS])
    (VENV / 'bench-parent').write_text(sys.executable)

def ensure_env() -> None:
    "Re-execute this script inside bench/.venv, creating it first if it is missing or was built from another interpreter."
    if _in_bench_env(): return
    marker = VENV / 'bench-parent'
    if not (_venv_python().exists() and marker.exists() and marker.read_text() == sys.executable): _make_env()
    os.execv(str(_venv_python()), [str(_venv_python()), str(Path(__file__).resolve()), *sys.argv[1:]])

# ---------------------------------------------------------------- running the tasks

def plan(quick: bool) -> list[tuple[str, str, dict]]:
    "(result key, task, parameters) in the order they run."
    if quick:
        return [('launch_ours', 'launch_ours', dict(later=5, spawn=1, torch_spawn=1, fastai_spawn=1)),
                ('launch_accelerate', 'launch_accelerate', dict(calls=6)),
                ('payload', 'payload', dict(reps=1)),
                ('train', 'train', dict(epochs=3, rounds=1, fit1_later=1)),
                ('raw', 'raw', dict(epochs=3, rounds=1)),
                ('return', 'return', dict(sizes=[100 * MB, 1024 * MB], reps=3))]
    return [('launch_ours', 'launch_ours', dict(later=7, spawn=3, torch_spawn=3, fastai_spawn=2)),
            ('launch_accelerate', 'launch_accelerate', dict(calls=8)),
            ('launch_ours_2', 'launch_ours', dict(later=1, spawn=0, torch_spawn=0, fastai_spawn=0)),
            ('payload', 'payload', dict(reps=3)),
            ('train', 'train', dict(epochs=5, rounds=2, fit1_later=3)),
            ('raw', 'raw', dict(epochs=5, rounds=2)),
            ('return', 'return', dict(sizes=[100 * MB, 1024 * MB], reps=5))]

def child_env() -> dict:
    "The child's environment: bench/ (worker helpers) and the repository on the path, for it and for its workers."
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(BENCH), str(REPO)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    env['PYTHONWARNINGS'] = 'ignore::FutureWarning'
    return env

def run_task(task: str, params: dict, logs: Path, timeout: float) -> dict:
    "Run one task in a fresh interpreter; its result dict, or {'error': ...} with the end of its log."
    out, log = logs / f'{task}-{time.monotonic_ns()}.json', logs / f'{task}.log'
    code = 'import bench_workers as b; b.child_main()'
    t = time.perf_counter()
    with open(log, 'a') as lf:
        p = subprocess.Popen([sys.executable, '-c', code, task, json.dumps(params), str(out)], env=child_env(),
                             cwd=tempfile.gettempdir(), stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
        try: rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL); p.wait()
            rc = f'timeout after {timeout:.0f} s'
    wall = time.perf_counter() - t
    if rc == 0 and out.exists():
        res = json.loads(out.read_text())
        res['task_wall_s'] = wall
        return res
    tail = log.read_text(errors='replace').replace('\r', '\n').strip().splitlines()[-12:]
    return {'error': f'exit {rc}', 'log_tail': tail, 'task_wall_s': wall}

# ---------------------------------------------------------------- summary

def med(xs) -> float: return statistics.median(xs)

def steady(rounds: list[list[float]]) -> list[float]:
    "Epoch times after each run's first epoch, pooled over runs."
    return [t for r in rounds for t in r[1:]]

def s(x: float) -> str: return f'{x:.3f} s' if x < 10 else f'{x:.1f} s'

def size(n: int) -> str: return f'{n / MB:,.1f} MB' if n >= MB else f'{n / 1024:,.1f} KB'

def ratio(a: float, b: float, floor: tuple[str, float] | None = None) -> str:
    "`a/b`, and whether it meets `floor` ('<=' or '>=', limit)."
    r = a / b
    text = f'{r:.2f}x' if r >= 0.01 else f'{r:.2g}x'
    if floor:
        op, lim = floor
        ok = r <= lim if op == '<=' else r >= lim
        text += f" (floor {op} {lim:g}: {'met' if ok else '**MISSED**'})"
    return text

class Table:
    "Rows of the results table; a row whose numbers are missing (a failed task) says so instead."
    def __init__(self, results: dict):
        self.results,self.rows = results,[]
    def machine(self, *keys) -> str:
        loads = [x for k in keys for x in self.results.get(k, {}).get('loadavg', [])]
        cores = os.cpu_count()
        return f'{cores}-core CPU, load {min(loads):.1f}-{max(loads):.1f}' if loads else f'{cores}-core CPU'
    def add(self, figure: str, keys: tuple, make) -> None:
        "Append `figure` with the cells `make()` returns (ours, peer, ratio), or a failure note."
        bad = [k for k in keys if k not in self.results or 'error' in self.results[k]]
        if bad: self.rows.append((figure, 'not measured', 'not measured', f"failed: {', '.join(bad)}", self.machine(*keys))); return
        try: ours, peer, rat = make()
        except (KeyError, ValueError, ZeroDivisionError, statistics.StatisticsError) as e:
            ours, peer, rat = 'not measured', 'not measured', f'failed: {type(e).__name__}: {e}'
        self.rows.append((figure, ours, peer, rat, self.machine(*keys)))

def build_table(R: dict) -> Table:
    T = Table(R)
    firsts = lambda: [R[k]['first_s'] for k in ('launch_ours', 'launch_ours_2') if k in R and 'error' not in R[k]]
    lo, la = ('launch_ours',), ('launch_ours', 'launch_accelerate')
    T.add('1. Launch trivial fn on 2 procs, first call of a session (warm server start) vs `ranch(start_method="spawn")`', lo,
          lambda: (s(med(firsts())), s(med(R['launch_ours']['spawn_s'])), ratio(med(firsts()), med(R['launch_ours']['spawn_s']), ('<=', 1))))
    T.add('1. Launch, first call vs `torch.multiprocessing.start_processes(spawn)`', lo,
          lambda: (s(med(firsts())), s(med(R['launch_ours']['torch_spawn_s'])), ratio(med(firsts()), med(R['launch_ours']['torch_spawn_s']))))
    T.add('1. Launch, first call vs spawn of a function that imports `fastai.basics`', lo,
          lambda: (s(med(firsts())), s(med(R['launch_ours']['spawn_fastai_s'])), ratio(med(firsts()), med(R['launch_ours']['spawn_fastai_s']))))
    T.add('1. Launch, later calls (median) vs accelerate `notebook_launcher(f, num_processes=2)` (fork, later calls)', la,
          lambda: (s(med(R['launch_ours']['later_s'])), s(med(R['launch_accelerate']['later_s'])),
                   ratio(med(R['launch_ours']['later_s']), med(R['launch_accelerate']['later_s']), ('<=', 2))))
    T.add('1. Launch, later calls vs `torch.multiprocessing.start_processes(spawn)`', lo,
          lambda: (s(med(R['launch_ours']['later_s'])), s(med(R['launch_ours']['torch_spawn_s'])),
                   ratio(med(R['launch_ours']['later_s']), med(R['launch_ours']['torch_spawn_s']))))
    P = lambda: R['payload']
    T.add('2. Payload of the digits Learner: bytes (ours: pickle + /dev/shm segment) vs `dill.dumps(learn, recurse=True)`', ('payload',),
          lambda: (size(P()['ours_bytes']), size(P()['dill_bytes']), ratio(P()['ours_bytes'], P()['dill_bytes'])))
    ship = lambda who: med([a + b for a, b in zip(P()[f'{who}_dump_s'], P()[f'{who}_load_s'])])
    T.add('2. Payload: seconds to serialize + load', ('payload',), lambda: (s(ship('ours')), s(ship('dill')), ratio(ship('ours'), ship('dill'))))
    tr, raw = ('train',), ('train', 'raw')
    sps = lambda rounds: R['train']['n_train'] / med(steady(rounds))
    T.add('3. Training samples/s, 1 process (2 threads): local `learn.fit` vs hand-written loop', raw,
          lambda: (f"{sps(R['train']['local_epochs']):,.0f}", f"{sps([r['epoch_s'] for r in R['raw']['single']]):,.0f}",
                   ratio(sps(R['train']['local_epochs']), sps([r['epoch_s'] for r in R['raw']['single']]))))
    T.add('3. Training samples/s, DDP 2 procs x 1 thread (gloo): `fit_ddp` vs hand-written DDP loop', raw,
          lambda: (f"{sps(R['train']['ddp_epochs']):,.0f}", f"{sps([r['epoch_s'] for r in R['raw']['ddp']]):,.0f}",
                   ratio(sps(R['train']['ddp_epochs']), sps([r['epoch_s'] for r in R['raw']['ddp']]))))
    eff_ours = lambda: sps(R['train']['ddp_epochs']) / sps(R['train']['local_epochs'])
    eff_raw = lambda: sps([r['epoch_s'] for r in R['raw']['ddp']]) / sps([r['epoch_s'] for r in R['raw']['single']])
    T.add('3. DDP efficiency (DDP samples/s / 1-process samples/s): ours vs hand-written', raw,
          lambda: (f'{eff_ours():.2f}', f'{eff_raw():.2f}', ratio(eff_ours(), eff_raw(), ('>=', 0.9))))
    T.add('4. Wall time of 1 epoch, first call of the session: `fit_ddp(1, nprocs=2)` vs local `fit(1)` (first)', tr,
          lambda: (s(R['train']['ddp1_first_s']), s(R['train']['local1_first_s']), ratio(R['train']['ddp1_first_s'], R['train']['local1_first_s'])))
    T.add('4. Wall time of 1 epoch, later call: `fit_ddp(1, nprocs=2)` vs local `fit(1)`', tr,
          lambda: (s(med(R['train']['ddp1_later_s'])), s(med(R['train']['local1_later_s'])),
                   ratio(med(R['train']['ddp1_later_s']), med(R['train']['local1_later_s']))))
    for nbytes in (100 * MB, 1024 * MB):
        ret = lambda: R['return'][str(nbytes)]
        T.add(f'5. Return a {size(nbytes)} state_dict, worker `return` -> caller holds it, vs one fresh memcpy', ('return',),
              lambda ret=ret: (s(med(ret()['received_s'])), s(med(ret()['memcpy_s'])), ratio(med(ret()['received_s']), med(ret()['memcpy_s']), ('<=', 3))))
        T.add(f'5. Return a {size(nbytes)} state_dict, received + copied into the model-like tensors, vs one fresh memcpy', ('return',),
              lambda ret=ret: (s(med(ret()['applied_s'])), s(med(ret()['memcpy_s'])), ratio(med(ret()['applied_s']), med(ret()['memcpy_s']), ('<=', 3))))
    return T

# ---------------------------------------------------------------- RESULTS.md

def versions() -> str:
    import importlib.metadata as md
    got = []
    for name in ('mpify_fastai', 'torch', 'fastai', 'accelerate', 'multiprocess', 'dill'):
        try: got.append(f'{name} {md.version(name)}')
        except md.PackageNotFoundError: got.append(f'{name} (not installed)')
    return ', '.join(got)

def cpu_model() -> str:
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'): return line.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()

METHOD = """\
## Method

Each group of figures runs in its own fresh child interpreter started as `python -c` (so `__main__` has no file,
as in a notebook), one at a time; the child first imports `torch` and `fastai.vision.all` like a notebook's first
cell. Ratios are ours / peer, computed from numbers taken in the same run; times are medians of the repetitions
listed under raw numbers. The machine is shared with other work: the machine column gives the 1-minute load
average at the start and end of the child that measured the row, and a load above the core count means the
numbers are inflated and noisy.

1. Launch: `ranch(2, f)` with `f` a trivial function defined in `__main__` (shipped by value). The first call
   starts the warm fork server (torch and fastai preloaded); later calls fork from it. Peers: `ranch(...,
   start_method='spawn')` and `torch.multiprocessing.start_processes(fn, nprocs=2, start_method='spawn')` in the
   same child (torch's spawn needs an importable function: `bench_workers.trivial_rank`), a spawn of a function
   that imports `fastai.basics` (what any training function pays under spawn), and accelerate's
   `notebook_launcher(f, num_processes=2)` (fork-based `elastic_launch`; it takes a `__main__` function as is) in
   a separate child that never touched CUDA, on a fresh port per call. The full run measures the first call in
   two fresh children.
2. Payload: `mpify_fastai.serialize.dumps(learn, segment_path=...)` (pickle bytes + the `/dev/shm` segment file,
   `Payload.nbytes`) then `loads`, vs `dill.dumps(learn, recurse=True)` then `dill.loads`, for the digits Learner
   (`Learner(digits_dls(), digits_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)`).
3. Throughput: an `EpochTimer` callback (rank 0) records each epoch's wall time (training on the 1,436 training
   images + validation on 361); samples/s = 1,436 / median epoch time, over every epoch but the first of each
   run, runs of local `fit` and `fit_ddp(nprocs=2)` alternating. The hand-written loop (bench_workers.raw_worker:
   `DataLoader` + `DistributedSampler`, bs 64 per process, drop_last, AdamW like fastai's default, gloo over a
   file store, sharded validation all-reduced) runs on 2 spawned processes with 1 thread each and on 1 spawned
   process with 2 threads. DDP efficiency = DDP samples/s / 1-process samples/s; the figure is ours / hand-written.
4. `fit_ddp(1, nprocs=2)` wall time: the session's first call (includes starting the warm server) and later
   calls, vs local `fit(1)` (its first call in the process, and later ones), same Learner.
5. Result return: `ranch(1, make_and_return, nbytes, gather=0)`; the worker builds an 8-tensor float32
   state_dict and returns `(time.time(), sd)`; the caller takes `time.time()` when `ranch` returns (received) and
   after `copy_` into a preallocated, already-touched set of tensors of the same shapes (received + applied).
   Baseline: `torch.empty(n).copy_(x)` into fresh memory (first-touch page faults included).

Not measured: the per-epoch overhead of the progress relay. Rank 0 sends a handful of events per epoch (epoch
start, one per bar start, batch updates throttled to one per 0.2 s, one table row), but a clean A/B needs a switch
in the package to drop them; timing the difference would also be below this shared machine's noise.
"""

def floors_note(T: Table) -> str:
    missed = [r for r in T.rows if 'MISSED' in r[3]]
    failed = [r for r in T.rows if r[3].startswith('failed')]
    lines = []
    for r in missed: lines.append(f'- Floor missed: {r[0]}: ours {r[1]}, peer {r[2]}, {r[3]}.')
    for r in failed: lines.append(f'- Not measured: {r[0]} ({r[3]}).')
    return '\n'.join(lines) if lines else '- Every floor was met and every figure was measured.'

def write_results(T: Table, R: dict, quick: bool, wall: float) -> str:
    head = ['figure', 'ours', 'peer', 'ratio', 'machine']
    table = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)] + ['| ' + ' | '.join(r) + ' |' for r in T.rows]
    text = f"""# mpify_fastai benchmark results

`python bench/run.py{' --quick' if quick else ''}` ({'quick run' if quick else 'full run'}), {time.strftime('%Y-%m-%d %H:%M %Z')},
{wall:.0f} s in all. Machine: {os.cpu_count()} x {cpu_model()}, no GPU, {_mem_gb():.0f} GB RAM, Python {platform.python_version()};
{versions()}.

{chr(10).join(table)}

## Floors

{floors_note(T)}

{METHOD}
## Raw numbers (seconds unless named otherwise)

```json
{json.dumps(R, indent=1, default=str)}
```
"""
    RESULTS.write_text(text)
    return '\n'.join(table)

def _mem_gb() -> float:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30

# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='fewer repetitions and epochs (a few minutes)')
    ap.add_argument('--only', nargs='*', help='run only these result keys (for debugging; RESULTS.md then lacks the rest)')
    a = ap.parse_args(argv)
    ensure_env()
    logs = Path(tempfile.mkdtemp(prefix='mpify-bench-logs-'))
    R, t0 = {}, time.perf_counter()
    for key, task, params in plan(a.quick):
        if a.only and key not in a.only: continue
        print(f'[{time.perf_counter() - t0:6.0f} s] {key} {params}', flush=True)
        R[key] = run_task(task, params, logs, timeout=300 if a.quick else 420)
        if 'error' in R[key]: print(f"  failed ({R[key]['error']}):\n    " + '\n    '.join(R[key]['log_tail']), flush=True)
    table = write_results(build_table(R), R, a.quick, time.perf_counter() - t0)
    print(table)
    print(f'\nwrote {RESULTS} in {time.perf_counter() - t0:.0f} s; child logs in {logs}')
    return 0

if __name__ == '__main__': raise SystemExit(main())
