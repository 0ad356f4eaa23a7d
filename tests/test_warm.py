"""The warm launcher (issue 6): one fork server per session, started in the background on import, restarted if it
dies, gone with its caller, CUDA-untouched, and fast for every launch after the first."""
import json, os, signal, subprocess, sys, textwrap, time
import pytest
from helpers import alive, subprocess_env

def _server_pid():
    from multiprocess import forkserver
    return getattr(forkserver._forkserver, '_forkserver_pid', None)

def _cuda_state():
    import torch
    return torch.cuda.is_initialized(), os.getppid()

def _cuda_state_of(t): return _cuda_state()

def test_later_launches_fork_from_one_server_that_never_touched_cuda():
    import torch  # noqa: F401  (a torch session: the server preloads what the caller has imported)
    from mpify_fastai import ranch
    from mpify_fastai.warm import prewarm, warm_ready
    prewarm().join()                            # what `import mpify_fastai` starts in a torch session, awaited
    ranch(1, _cuda_state_of, torch.zeros(1))    # a torch job: served by the warm server, which is then known ready
    assert warm_ready()
    server = _server_pid()
    t = time.monotonic()
    res = ranch(2, _cuda_state)
    took = time.monotonic() - t
    assert server is not None and alive(server)
    assert res == [(False, server), (False, server)], "workers are children of the one server, with no CUDA state"
    assert took < 3, f"a warm launch took {took:.2f} s"

def test_a_dead_server_is_restarted_by_the_next_launch():
    from mpify_fastai import ranch
    ranch(1, _cuda_state)
    old = _server_pid()
    os.kill(old, signal.SIGKILL)
    for _ in range(100):
        if not alive(old): break
        time.sleep(0.05)
    import torch
    [(cuda, parent)] = ranch(1, _cuda_state_of, torch.zeros(1))   # a tensor argument: a torch job, so it uses the server
    assert parent == _server_pid() != old and alive(parent) and not cuda

SCRIPT = textwrap.dedent('''
    import os, sys, time
    import torch                      # a torch session: importing mpify_fastai pre-starts the warm server
    import mpify_fastai
    from multiprocess import forkserver
    if __name__ == '__main__':
        deadline = time.monotonic() + 60
        while getattr(forkserver._forkserver, '_forkserver_pid', None) is None and time.monotonic() < deadline: time.sleep(0.05)
        print(getattr(forkserver._forkserver, '_forkserver_pid', None), flush=True)   # before any launch
        if sys.argv[1] == 'launch': print(mpify_fastai.ranch(1, os.getpid)[0], flush=True)
        time.sleep(600)
''')

@pytest.mark.parametrize('launch', ['idle', 'launch'])
def test_server_is_prestarted_on_import_and_dies_with_a_killed_caller(tmp_path, launch):
    script = tmp_path / 'session.py'
    script.write_text(SCRIPT)
    p = subprocess.Popen([sys.executable, str(script), launch], stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        server = int(p.stdout.readline())
        assert alive(server), "import mpify_fastai in a torch session starts the server in the background"
        if launch == 'launch': int(p.stdout.readline())
        os.kill(p.pid, signal.SIGKILL); p.wait()
        deadline = time.monotonic() + 10
        while alive(server) and time.monotonic() < deadline: time.sleep(0.1)
        assert not alive(server), "the warm server outlived its SIGKILLed caller"
    finally:
        if p.poll() is None: p.kill(); p.wait()

def test_prewarm_can_be_turned_off(tmp_path):
    code = ("import time, torch, mpify_fastai\nfrom multiprocess import forkserver\ntime.sleep(1)\n"
            "print(getattr(forkserver._forkserver, '_forkserver_pid', None))")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                       env=subprocess_env(MPIFY_PREWARM='0'))
    assert r.returncode == 0 and r.stdout.strip() == 'None', r.stderr

def test_a_light_call_does_not_wait_for_a_starting_server():
    "While the server is still importing torch/fastai, a call whose payload needs neither runs on spawn at once."
    from mpify_fastai import ranch
    from mpify_fastai.warm import stop_warm_server, warm_ready
    stop_warm_server()
    t = time.monotonic()
    assert ranch(2, _sum, 1, 2) == [3, 3]
    assert time.monotonic() - t < 5 and not warm_ready()   # done before the server finished starting

def _sum(a, b): return a + b

ENV_SCRIPT = textwrap.dedent('''
    import json, operator, os, sys, threading
    changes = []    # every change to this process's environment, by any thread
    sys.addaudithook(lambda event, args: event in ('os.putenv', 'os.unsetenv') and changes.append(
        (threading.current_thread().name, event, str(args[0]))))
    from multiprocess import forkserver
    from mpify_fastai import ranch
    from mpify_fastai.warm import prewarm, stop_warm_server
    sys.path.append(sys.argv[1])            # a folder added at run time: the server still imports with it
    for _ in range(3):
        stop_warm_server()
        assert ranch(2, operator.add, 1, 2) == [3, 3]   # light: its workers spawn while the prewarm thread starts the server
        prewarm().join()
    with open(f'/proc/{forkserver._forkserver._forkserver_pid}/environ', 'rb') as f: env = f.read().decode().split('\\0')
    print(json.dumps(dict(changes=changes, server_path=[v[11:] for v in env if v.startswith('PYTHONPATH=')])))
''')

def test_starting_the_server_never_changes_the_callers_environment(tmp_path):
    """The server gets the caller's `sys.path` in its own environment. Setting PYTHONPATH in `os.environ` from the prewarm
    thread made a light call's worker, exec'd meanwhile, read a changing environment: exec failed (EFAULT), code 255."""
    r = subprocess.run([sys.executable, '-c', ENV_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120,
                       env=subprocess_env())
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.splitlines()[-1])
    assert res['changes'] == [], f"the caller's environment changed while the server started: {res['changes']}"
    assert str(tmp_path) in res['server_path'][0].split(os.pathsep), res
