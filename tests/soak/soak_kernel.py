"""A real Jupyter kernel driven directly (jupyter_client), for the soak and fault-campaign runs: cells run while the
test injects faults, and each cell reports what it found on a `RESULT {json}` line."""
from __future__ import annotations
import json, queue, shutil, sys, tempfile, time
from pathlib import Path
import helpers

def _spec_dir(private_shm_mb: int | None) -> str:
    "A kernelspec folder whose kernel runs this interpreter, in a private mount namespace with a small /dev/shm if asked."
    d = Path(tempfile.mkdtemp(prefix='soak-kernelspec-'), 'soak')
    d.mkdir()
    argv = [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}']
    if private_shm_mb:
        argv = ['unshare', '-m', 'sh', '-c', f'mount -t tmpfs -o size={private_shm_mb}m tmpfs /dev/shm && exec "$0" "$@"', *argv]
    (d / 'kernel.json').write_text(json.dumps(dict(argv=argv, display_name='soak', language='python')))
    return str(d.parent)

class Kernel:
    "One kernel: `run(code)` executes a cell; `start(code)` / `wait_marker` / `finish` let the test act while it runs."
    def __init__(self, cwd: str, private_shm_mb: int | None = None):
        from jupyter_client import KernelManager
        from jupyter_client.kernelspec import KernelSpecManager
        self.spec_dir = _spec_dir(private_shm_mb)
        self.km = KernelManager(kernel_name='soak', kernel_spec_manager=KernelSpecManager(kernel_dirs=[self.spec_dir]))
        self.km.start_kernel(env=helpers.kernel_env(), cwd=cwd)
        self.kc = self.km.client(); self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)
        self.pid = self.km.provisioner.process.pid
        self.text, self.msg_id, self.done = [], None, True

    def start(self, code: str) -> None:
        self.msg_id, self.text, self.done = self.kc.execute(code), [], False

    def _pump(self, timeout: float) -> dict | None:
        "Collect one iopub message of the running cell into `text`; return it (None on timeout)."
        try: m = self.kc.get_iopub_msg(timeout=timeout)
        except queue.Empty: return None
        if m['parent_header'].get('msg_id') != self.msg_id: return m
        c, t = m['content'], m['msg_type']
        if t == 'stream': self.text.append(c['text'])
        elif t == 'error': self.text.append(helpers.strip_ansi('\n'.join(c['traceback'])) + '\n')
        elif t == 'status' and c['execution_state'] == 'idle': self.done = True
        return m

    def wait_marker(self, marker: str, timeout: float = 120) -> float:
        "Wait until the cell prints `marker`; return the time it was seen (monotonic)."
        deadline = time.monotonic() + timeout
        while marker not in ''.join(self.text):
            if time.monotonic() > deadline: raise AssertionError(f"no {marker!r} in {timeout} s:\n{''.join(self.text)[-3000:]}")
            self._pump(0.01)
        return time.monotonic()

    def finish(self, timeout: float = 300) -> str:
        "Wait for the cell to end (its idle status); return everything it printed."
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline: raise AssertionError(f"cell did not end in {timeout} s:\n{''.join(self.text)[-3000:]}")
            if self.done: return ''.join(self.text)
            self._pump(1)

    def until(self, when: float) -> bool:
        "Follow the running cell until monotonic time `when`; True if it is still running then."
        while not self.done and time.monotonic() < when: self._pump(min(0.005, max(0, when - time.monotonic())))
        return not self.done

    def run(self, code: str, timeout: float = 300) -> str:
        self.start(code)
        return self.finish(timeout)

    def results(self, text: str) -> list[dict]:
        return [json.loads(l[len('RESULT '):]) for l in text.splitlines() if l.startswith('RESULT ')]

    def close(self):
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)
        shutil.rmtree(self.spec_dir, ignore_errors=True)
