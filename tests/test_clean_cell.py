"""A clean cell: the warm server's own imports add no warnings to the notebook's output, while what a worker warns
about during the run still reaches the cell, with its rank. Real kernel, real workers, and a real script whose raw
stderr shows what the server itself prints."""
import subprocess, sys
import pytest
from helpers import cell_errors, cell_output, run_notebook, subprocess_env

SCRIPT = """
from fastai.vision.all import *       # warns once here: torch.jit.script is deprecated
import mpify_fastai
from mpify_fastai import in_torchddp
if __name__ == '__main__': print(in_torchddp(1, int))   # starts the warm server, which imports torch and fastai again
"""

def test_server_imports_print_nothing(tmp_path):
    "The warm server's own imports print no warning: the caller's stderr shows the deprecation once, from its own import."
    script = tmp_path / 'run.py'
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       env=subprocess_env(MPIFY_PREWARM=0))
    assert r.returncode == 0 and r.stdout.strip() == '[0]', r.stderr
    assert r.stderr.count('torch.jit.script') == 1, r.stderr

pytestmark = pytest.mark.usefixtures('no_leftovers')

CELLS = [
    # no pre-start: the server starts inside the fit_ddp cell, so anything its imports print lands in that cell's output
    'import os, warnings\nos.environ["MPIFY_PREWARM"] = "0"\nfrom fastai.vision.all import *\nimport mpify_fastai\n'
    'from mpify_fastai.demo import digits_cnn, digits_dls',
    ('class Shout(Callback):\n'
     '    def before_fit(self): warnings.warn(f"rank {os.environ[\'RANK\']} has something to say")\n'
     'learn = Learner(digits_dls(), digits_cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)'),
    'learn.fit_ddp(1, 1e-2, nprocs=2, cbs=Shout())',
    'learn.fit_ddp(1, 1e-2, nprocs=2)',
]

def test_server_imports_stay_quiet_worker_warnings_show():
    "The first fit_ddp of a session shows no FutureWarning from the server's imports, but shows each rank's own warning."
    nb = run_notebook(CELLS, timeout=180)
    assert not any(cell_errors(c) for c in nb.cells)
    first, second = cell_output(nb.cells[2], 'stderr'), cell_output(nb.cells[3], 'stderr')
    assert 'FutureWarning' not in first + second, first
    assert 'rank 0 has something to say' in first and '[rank 1] ' in first and 'rank 1 has something to say' in first
    assert second.strip() == '', second
