"""A notebook that used CUDA first (issue 16): in a real Jupyter kernel (nbclient), `torch.zeros(1).cuda()` and a
local `learn.fit(1)` on the GPU, then `learn.fit_ddp(1, nprocs=1)`. Fork-based launchers fail here; the warm fork
server, started by a kernel that already holds a CUDA context, must not. CPU stand-in: the same cells minus `.cuda()`."""
from __future__ import annotations
import json

import pytest

import helpers
import gpu_helpers as gh

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gh.RUNS, reason=gh.NO_GPU), pytest.mark.timeout(180)]

CELLS = [f'''
import json, torch
if {gh.HAVE_GPU}: torch.zeros(1).cuda()
cuda_first = torch.cuda.is_initialized()
''', '''
from fastai.metrics import accuracy
import mpify_fastai                      # in a torch session: starts the warm fork server now
import fastai_helpers as fh
dls = fh.digits_dls_plain(512, 256, bs=64)
dls.to(torch.device('cuda', 0) if torch.cuda.is_available() else torch.device('cpu'))   # the data on the notebook's GPU
learn = fh.sgd_learner(dls, fh.mlp(0), metrics=accuracy)
learn.fit(1, 0.1)                        # local, on the notebook's device
local_device = str(next(learn.model.parameters()).device)
''', '''
learn.fit_ddp(1, 0.1, nprocs=1, timeout=120)
''', '''
last = [float(v) for v in learn.recorder.values[-1]]
val = [float(v) for v in learn.validate()]
print('RESULT ' + json.dumps(dict(cuda_first=cuda_first, local_device=local_device, rows=len(learn.recorder.values),
                                  device=str(next(learn.model.parameters()).device), last=last, val=val)))
''']

def test_fit_ddp_after_the_notebook_used_cuda():
    nb = helpers.run_notebook(CELLS, timeout=180, allow_errors=True)
    for i, cell in enumerate(nb.cells):
        assert not helpers.cell_errors(cell), f"cell {i} failed:\n{helpers.cell_output(cell)}"
    out = helpers.cell_output(nb.cells[-1], 'stdout')
    res = json.loads(next(l for l in out.splitlines() if l.startswith('RESULT '))[len('RESULT '):])
    assert res['cuda_first'] is gh.HAVE_GPU
    assert res['local_device'] == res['device'] == str(gh.DEVICE), "the model is not back on the notebook's device"
    assert res['rows'] == 1
    assert max(abs(a - b) for a, b in zip(res['last'][1:], res['val'])) < 1e-4, res
