"""Fixtures shared by the test suite. Process tests use real processes: nothing here mocks the launcher."""
from __future__ import annotations
import os, sys
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]
try:
    import mpify_fastai  # noqa: F401
except ImportError:   # not installed (a bare checkout): import it from the repository, workers inherit sys.path
    sys.path.insert(0, str(REPO))

import helpers  # noqa: E402  (tests/ is on sys.path: pytest puts a rootdir conftest's folder there)

def new_shm_leftovers(before: set[str], pids=()) -> list[str]:
    """Scratch entries (`mpify-<pid>-*`, `torch_<pid>_*`) that appeared since `before` and belong to this process
    or to one of `pids`. Other sessions may run their own launches on this machine at the same time: their
    entries (other pids, or no pid in the name) are none of our business."""
    mine = {os.getpid(), *pids}
    return [p for p in sorted(helpers.shm_entries() - before) if helpers.owner_pid(p) in mine]

@pytest.fixture
def no_leftovers():
    """After the test: no descendant processes of this one (zombies included; the multiprocessing forkserver and
    resource tracker themselves excepted) and no new /dev/shm/mpify-* / torch_* entries."""
    before_shm = helpers.shm_entries()
    before_procs = {c['pid'] for c in helpers.children_of()}
    yield
    left = helpers.leftover_processes(ignore=before_procs)
    shm = new_shm_leftovers(before_shm)
    helpers.kill_quietly(c['pid'] for c in left if c['state'] != 'Z')   # do not poison the next tests
    assert not left, f"leftover processes after the test: {left}"
    assert not shm, f"leftover scratch files after the test: {shm}"

@pytest.fixture
def main_ns():
    """Define notebook-style code in `__main__` (as a notebook cell would): `main_ns(src)` executes `src` there and
    returns the module dict. Everything the test added to `__main__` is removed afterwards."""
    main = sys.modules['__main__'].__dict__
    before = dict(main)
    def define(src: str) -> dict:
        exec(compile(src, '<notebook cell>', 'exec'), main)
        return main
    yield define
    for k in list(main):
        if k not in before: del main[k]
    main.update(before)

@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    "Every test runs in its own folder: what fastai writes relative to a Learner's path ('models/...') never lands in the repository."
    monkeypatch.chdir(tmp_path)
