"""nbdev compatibility: a user's own nbdev project (pyproject.toml with [tool.nbdev], current nbdev from the package
index, installed by the `dev` extra) whose notebook trains with `learn.fit_ddp(1, nprocs=2)` passes `nbdev-test`.

nbdev-test runs a notebook in-process (execnb's CaptureShell, an IPython shell without a kernel), so this is a
different home for notebook code than Jupyter's: notebook functions, lambdas and metrics must still travel."""
from __future__ import annotations
import subprocess, sys
from pathlib import Path
import nbformat
import helpers

PYPROJECT = '''[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "ddpdocs"
version = "0.0.1"
description = "A user's nbdev project whose docs train with fit_ddp"
requires-python = ">=3.10"
dependencies = []

[tool.nbdev]
lib_path = "ddpdocs"
nbs_path = "nbs"
'''

CELLS = [
    "from fastai.vision.all import *\nimport mpify_fastai\nfrom mpify_fastai import ranch\n"
    "from mpify_fastai.demo import digits_dls, digits_cnn",
    "SCALE = 3\ndef scaled(x): return x * SCALE\nassert ranch(2, scaled, 2) == [6, 6]",
    "def top1(inp, targ): return (inp.argmax(dim=-1) == targ).float().mean()   # a metric defined in the notebook\n"
    "learn = Learner(digits_dls(), digits_cnn(), loss_func=lambda o, t: F.cross_entropy(o, t), metrics=top1)\n"
    "learn.fit_ddp(1, 1e-2, nprocs=2)",
    "assert len(learn.recorder.values) == 1\n"
    "row = list(learn.recorder.values[-1])   # read first: validate() replaces the recorder's values with its own\n"
    "valid_loss, acc = learn.validate()\n"
    "assert abs(row[-1] - acc) < 1e-4 and abs(row[-2] - valid_loss) < 1e-4, (row, acc)",
]

def nbdev_test_command() -> Path:
    exe = Path(sys.executable).parent / 'nbdev-test'
    assert exe.exists(), f"{exe} is missing: nbdev comes with the dev extra (pip install -e '.[dev]')"
    return exe

def make_project(root: Path, cells: list[str]) -> Path:
    (root / 'nbs').mkdir(parents=True)
    (root / 'pyproject.toml').write_text(PYPROJECT)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata['kernelspec'] = dict(name='python3', display_name='Python 3', language='python')
    nbformat.write(nb, root / 'nbs' / '00_core.ipynb')
    return root

def run_nbdev_test(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(nbdev_test_command()), '--do-print'], cwd=root, env=helpers.subprocess_env(),
                          capture_output=True, text=True, timeout=240)

def test_fit_ddp_in_an_nbdev_project_passes_nbdev_test(tmp_path):
    res = run_nbdev_test(make_project(tmp_path / 'ddpdocs', CELLS))
    assert res.returncode == 0 and 'Success' in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]

def test_nbdev_test_reports_a_failing_fit_ddp(tmp_path):
    "The check above can fail: a worker error in the notebook fails nbdev-test, naming the rank."
    cells = CELLS[:1] + ["learn = Learner(digits_dls(), digits_cnn(), loss_func=CrossEntropyLossFlat())\n"
                         "learn.fit_ddp(1, 1e-2, nprocs=2, cbs=[Callback(before_fit=lambda self: 1 / 0)])"]
    res = run_nbdev_test(make_project(tmp_path / 'ddpdocs', cells))
    out = res.stdout + res.stderr
    assert res.returncode != 0 and 'ZeroDivisionError' in out and 'rank' in out, out[-3000:]
