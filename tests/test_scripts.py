"""`ranch` from batch scripts: with the `if __name__ == "__main__":` guard it works; without it, a short MainGuardError."""
import subprocess, sys, textwrap, time
import pytest
import helpers

pytestmark = pytest.mark.usefixtures('no_leftovers')

WORKER = '''
import os, sys
from mpify_fastai import ranch

OFFSET = 100

def work(x):
    r = int(os.environ['RANK'])
    print(f'hello from rank {r}')
    print(f'note from rank {r}', file=sys.stderr)
    return x + r + OFFSET
'''

def _write(tmp_path, body: str):
    path = tmp_path / 'job.py'
    path.write_text(textwrap.dedent(body))
    return path

def _kw(method): return '' if method == 'default' else f', start_method={method!r}'

@pytest.mark.parametrize('method', ['default', 'spawn', 'forkserver'])
def test_guarded_script_works(tmp_path, method):
    path = _write(tmp_path, WORKER + f'''
if __name__ == "__main__":
    print('result', ranch(2, work, 1{_kw(method)}))
''')
    r = helpers.run_script(path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ['hello from rank 0', 'result [101, 102]']   # rank 0's prints only
    assert sorted(r.stderr.splitlines()) == ['[rank 1] note from rank 1', 'note from rank 0']
    assert helpers.scratch_of(r.pid) == []

@pytest.mark.parametrize('method', ['default', 'spawn'])
def test_script_read_from_stdin_works(tmp_path, method):
    "`python - < job.py`: __main__.__file__ is '<stdin>', no file a worker could run; it is left out, as for a notebook."
    script = textwrap.dedent(WORKER + f"""
import torch
if __name__ == "__main__":
    print('result', ranch(2, work, 1{_kw(method)}), ranch(2, work, torch.ones(1){_kw(method)}))
""")
    r = subprocess.run([sys.executable, '-'], input=script, capture_output=True, text=True, timeout=120,
                       cwd=tmp_path, env=helpers.subprocess_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == 'result [101, 102] [tensor([101.]), tensor([102.])]'

def test_guarded_script_worker_error_is_short_and_clear(tmp_path):
    path = _write(tmp_path, WORKER + '''
def bad(x):
    if os.environ['RANK'] == '1': raise KeyError(x)
    return x
if __name__ == "__main__":
    ranch(2, bad, 'missing-key')
''')
    r = helpers.run_script(path)
    assert r.returncode == 1 and helpers.scratch_of(r.pid) == []
    assert "mpify_fastai.errors.WorkerError: rank 1 raised KeyError: 'missing-key'" in r.stderr
    assert '--- traceback from rank 1 ---' in r.stderr and 'in bad' in r.stderr

@pytest.mark.parametrize('method', ['default', 'spawn', 'forkserver'])
def test_unguarded_script_raises_main_guard_error(tmp_path, method):
    path = _write(tmp_path, WORKER + f'''
print('result', ranch(2, work, 1{_kw(method)}))
''')
    t = time.monotonic()
    r = helpers.run_script(path)
    took = time.monotonic() - t
    assert r.returncode == 1 and took < 20
    err = r.stderr
    last = err.strip().splitlines()[-1]
    assert last.startswith('mpify_fastai.errors.MainGuardError: ')
    assert 'if __name__ == "__main__":' in last and len(last) < 250
    assert 'bootstrapping phase' not in err and 'freeze_support' not in err   # no multiprocessing wall of text
    assert len(err.splitlines()) < 20, err
    assert 'hello from rank' not in r.stdout       # the workers never ran the function
    assert helpers.scratch_of(r.pid) == []
