"""`ranch` driven from a real Jupyter kernel (nbclient): notebook-defined code, and errors shown in a cell."""
import json
import pytest
import helpers
from helpers import cell_errors, cell_output, run_notebook

pytestmark = pytest.mark.usefixtures('no_leftovers')   # the kernel and its workers are gone afterwards

CHILDREN = '''
from helpers import children_of, mp_helper_pids
def live_children():
    """Command lines of this kernel's descendants, except the resource trackers and fork server themselves (kept on
    purpose for the session; their children are listed)."""
    kept = mp_helper_pids()
    return [c['cmdline'] for c in children_of() if c['pid'] not in kept and 'resource_tracker' not in c['cmdline']]
'''

def test_notebook_function_lambda_class_global():
    cells = [
        'from mpify_fastai import ranch',
        'SCALE = 10',
        'square = lambda v: v * v',
        ('class Acc:\n'
         '    def __init__(self): self.items = []\n'
         '    def add(self, v):\n'
         '        self.items.append(v)\n'
         '        return self\n'
         '    def total(self): return sum(self.items) * SCALE'),
        ('def work(n):\n'
         '    import os\n'
         '    r = int(os.environ["RANK"])\n'
         '    acc = Acc().add(square(r + n)).add(globals()["BONUS"])   # BONUS reached only through need=\n'
         '    print(f"rank {r} working")\n'
         '    return r, acc.total(), Fraction(r + 1, n), type(acc).__name__, acc'),
        'BONUS = 5',
        ('res = ranch(2, work, 3, need="BONUS", imports="from fractions import Fraction")\n'
         'assert "Fraction" not in globals(), "imports= must not touch the notebook"\n'
         'assert isinstance(res[1][4], Acc), "a notebook class returned from a worker is the notebook\'s class"\n'
         'assert res[1][4].items == [16, 5] and res[1][4].total() == 210'),
        'import json; print(json.dumps([[r, t, str(f), name] for r, t, f, name, _ in res]))',
        CHILDREN + 'print(json.dumps(live_children()))',
    ]
    nb = run_notebook(cells)
    run_cell, json_cell, children_cell = nb.cells[6], nb.cells[7], nb.cells[8]
    assert not any(cell_errors(c) for c in nb.cells)
    out = cell_output(run_cell, 'stdout')
    assert 'rank 0 working' in out and 'rank 1 working' not in out        # rank 0's prints only, by default
    assert json.loads(cell_output(json_cell, 'stdout')) == [[0, 140, '1/3', 'Acc'], [1, 210, '2/3', 'Acc']]
    assert json.loads(cell_output(children_cell, 'stdout')) == []

def test_notebook_worker_error_then_next_cell_works():
    cells = [
        'from mpify_fastai import ranch, WorkerError\nimport time',
        ('def flaky(n):\n'
         '    import os, time\n'
         '    r = int(os.environ["RANK"])\n'
         '    if r == n:\n'
         '        raise ValueError(f"boom from rank {r}")\n'
         '    time.sleep(60)\n'
         '    return r'),
        ('t0 = time.monotonic()\n'
         'try:\n'
         '    ranch(2, flaky, 1)\n'
         'finally:\n'
         '    elapsed = time.monotonic() - t0'),
        'print("elapsed", elapsed)\nprint("next", ranch(2, lambda: 7))',
        CHILDREN + 'import json; print(json.dumps(live_children()))',
    ]
    nb = run_notebook(cells, allow_errors=True)
    errs = cell_errors(nb.cells[2])
    assert len(errs) == 1
    err = errs[0]
    assert err['ename'] == 'WorkerError' and err['evalue'].startswith('rank 1 raised ValueError: boom from rank 1')
    shown = cell_output(nb.cells[2])
    assert 'rank 1' in shown and '--- traceback from rank 1 ---' in shown
    assert 'in flaky' in shown and shown.count('ValueError: boom from rank 1') >= 2   # remote traceback + header
    assert not any(cell_errors(c) for c in nb.cells[3:])
    lines = cell_output(nb.cells[3], 'stdout').splitlines()
    assert float(lines[0].split()[1]) < 10, lines      # rank 0 slept 60 s: it was stopped, not waited for
    assert lines[1] == 'next [7, 7]'
    assert json.loads(cell_output(nb.cells[4], 'stdout')) == []

def test_kernel_interrupt_stops_workers(tmp_path):
    "The notebook's stop button (SIGINT to the kernel) while workers sleep: KeyboardInterrupt, no worker left."
    cells = [
        'from mpify_fastai import ranch\nimport json' + CHILDREN,
        ('def sleeper(folder):\n'
         '    import os, time\n'
         '    with open(os.path.join(folder, "pid-" + os.environ["RANK"]), "w") as f: f.write(str(os.getpid()))\n'
         '    time.sleep(60)'),
        f'ranch(2, sleeper, {str(tmp_path)!r})',
        'print(json.dumps({"left": live_children(), "next": ranch(2, lambda: 1)}))',
    ]
    nb = run_notebook(cells, allow_errors=True, interrupt_after={2: 5})
    errs = cell_errors(nb.cells[2])
    assert [e['ename'] for e in errs] == ['KeyboardInterrupt']
    assert not cell_errors(nb.cells[3])
    assert json.loads(cell_output(nb.cells[3], 'stdout')) == {'left': [], 'next': [1, 1]}
    pids = [int((tmp_path / f'pid-{r}').read_text()) for r in (0, 1)]
    assert [helpers.proc_state(p) for p in pids] == [None, None]
