"""The API surface: what a user sees of the entry points before and after a launch. Options declared once show in every
signature; `learn.ddp(n)` has real methods; every argument is checked before a process starts; errors show the user's
line, not the library's frames; `ranch` passes events on; a payload says what it needs. Real processes and kernels."""
from __future__ import annotations
import inspect, os, time
import pytest
from fastai.callback.core import Callback
from fastai.learner import Learner
import fastai.callback.schedule  # noqa: F401  (fit_one_cycle, fine_tune on Learner)
import mpify_fastai
from mpify_fastai import PayloadError, WorkerError, in_torchddp, ranch
from mpify_fastai.serialize import dumps
import fastai_helpers as fh
import helpers

PACKAGE = os.path.dirname(mpify_fastai.__file__)

def _library_frames(e: BaseException) -> list:
    "The frames of `e`'s traceback inside this package that a user would be shown (not hidden with __tracebackhide__)."
    tb, out = e.__traceback__, []
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(PACKAGE) and not tb.tb_frame.f_locals.get('__tracebackhide__'):
            out.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return out

@pytest.fixture(scope='module')
def learn() -> Learner: return fh.sgd_learner(fh.digits_dls_plain(64, 32, bs=16), fh.mlp(0))

def test_launch_options_are_declared_once_and_shown_everywhere():
    "Every entry point's signature lists the launch options, with their defaults, from the one record that declares them."
    from mpify_fastai.launch import LaunchOptions
    from dataclasses import fields
    for entry in (ranch, in_torchddp, Learner.fit_ddp, Learner.ddp, mpify_fastai.fit_ddp):
        params = inspect.signature(entry).parameters
        for f in fields(LaunchOptions):
            assert params[f.name].default == f.default and params[f.name].kind is inspect.Parameter.KEYWORD_ONLY, (entry, f.name)
    for entry in (Learner.fit_ddp, Learner.ddp):
        assert {'backend', 'devices', 'progress', 'max_restarts'} <= set(inspect.signature(entry).parameters)
    assert 'backend' in inspect.signature(in_torchddp).parameters and 'backend' not in inspect.signature(ranch).parameters

def test_ddp_methods_are_real_methods(learn):
    "Tab lists what learn.ddp(n) can run; each has the Learner method's signature and docstring (help, Shift-Tab)."
    m = learn.ddp(nprocs=2)
    assert set(mpify_fastai.learner.METHODS) <= set(dir(m))
    for name in mpify_fastai.learner.METHODS:
        bound, original = inspect.signature(getattr(m, name)), inspect.signature(getattr(learn, name))
        assert bound == original, name
        assert inspect.getdoc(getattr(Learner, name)) in inspect.getdoc(getattr(m, name))
    assert 'n_epoch' in inspect.signature(m.fit_one_cycle).parameters and 'lr_max' in inspect.signature(m.fit_one_cycle).parameters

BAD = {
    'schedule kwarg': (lambda l: l.ddp(nprocs=2).fit_one_cycle(3, bogus=1), TypeError, "fit_one_cycle(3, bogus=1)"),
    'fine_tune kwarg passed on': (lambda l: l.ddp(nprocs=2).fine_tune(1, bogus=1), TypeError, "'bogus'"),
    'schedule missing epochs': (lambda l: l.ddp(nprocs=2).fit(), TypeError, "'n_epoch'"),
    'inference kwarg': (lambda l: l.ddp(nprocs=2).get_preds(bogus=1), TypeError, "'bogus'"),
    'nprocs=0': (lambda l: l.fit_ddp(1, nprocs=0), ValueError, 'nprocs must be a positive int, got 0'),
    'timeout text': (lambda l: l.ddp(nprocs=2, timeout='soon').fit(1), ValueError, "timeout must be"),
    'unknown option': (lambda l: l.ddp(nprocs=2, speed=3), TypeError, 'unexpected launch option(s): speed'),
    'max_restarts': (lambda l: l.fit_ddp(1, nprocs=2, max_restarts=-1), ValueError, 'max_restarts must be'),
    'backend': (lambda l: l.fit_ddp(1, nprocs=2, backend='mpi'), ValueError, 'backend must be one of'),
    'ddp_kwargs': (lambda l: l.fit_ddp(1, nprocs=2, ddp_kwargs=[1]), TypeError, 'ddp_kwargs must be a dict'),
    'function form method': (lambda l: mpify_fastai.fit_ddp(lambda: l, 1, nprocs=2, method='fit_fast'), ValueError, 'method must be'),
    'save_ddp_job kwarg': (lambda l: l.save_ddp_job('job.pkl', 1, bogus=1), TypeError, "'bogus'"),
}

@pytest.mark.parametrize('case', list(BAD))
def test_bad_input_fails_before_anything_starts_from_the_users_line(learn, case, no_leftovers):
    "Each bad call raises its specific error at once, no worker started, and no library frame above the user's line."
    call, exc, message = BAD[case]
    t = time.monotonic()
    with pytest.raises(exc) as ei: call(learn)
    assert time.monotonic() - t < 2 and message in str(ei.value)
    assert _library_frames(ei.value) == [] and ei.value.__cause__ is None and ei.value.__suppress_context__
    assert not os.path.exists('job.pkl')

def test_payload_error_has_no_chained_internal_error(learn):
    "A PayloadError names the culprit and comes without the pickler's TypeError chained above it."
    class Streaming(Callback):
        def __init__(self): self.gen = (i for i in range(3))
    learn.add_cb(Streaming())
    try:
        with pytest.raises(PayloadError, match=r'learn\.streaming\.gen: <generator>') as ei: learn.fit_ddp(1, nprocs=2)
    finally: learn.remove_cb(learn.streaming)
    assert ei.value.__cause__ is None and ei.value.__suppress_context__ and _library_frames(ei.value) == []

def test_worker_error_shows_the_users_frames_not_the_launchers():
    "A WorkerError's traceback starts at the user's function: no frame of the worker plumbing above it."
    with pytest.raises(WorkerError) as ei: ranch(2, helpers.fail_on, 1, 'raise')
    tb = ei.value.remote_traceback
    assert 'fail_on' in tb and 'worker.py' not in tb and 'launch.py' not in tb, tb
    assert tb.splitlines()[0] == 'Traceback (most recent call last):'
    assert _library_frames(ei.value) == [] and isinstance(ei.value.__cause__, Exception)

def test_ranch_passes_events_on():
    "What a ranch function sends with send_event reaches on_event(rank, *data), in order per rank, while it runs."
    events = []
    assert ranch(2, helpers.eventful, 3, output='none', on_event=lambda r, *data: events.append((r, *data))) == [None, None]
    for r in (0, 1): assert [e for e in events if e[0] == r] == [(r, 'step', r, i) for i in range(3)]

def test_payload_says_what_it_needs():
    "dumps records the packages whose objects it pickled: the launcher picks the start method from that, not the bytes."
    import torch
    assert not dumps((helpers.echo, (1, 'torch fastai'), {})).needs_torch
    assert dumps((helpers.echo, (torch.zeros(3),), {})).needs_torch
    assert dumps(fh.mlp(0)).needs_torch and 'torch' in dumps(fh.mlp(0)).packages

NOTEBOOK_ERRORS = {
    'nprocs=0': 'learn.fit_ddp(1, nprocs=0)',
    'timeout': "learn.ddp(nprocs=2, timeout='soon').fit(1)",
    'schedule kwarg': 'learn.ddp(nprocs=2).fit_one_cycle(3, bogus=1)',
    'payload': 'ranch(2, len, open("data.txt", "w"))',
    'worker': 'ranch(2, boom)',
}

def test_error_cells_show_at_most_three_frames():
    "In a real kernel each error cell shows the user's line and the message: at most 3 frames, no chained exception."
    setup = ('import fastai_helpers as fh\nimport mpify_fastai\nfrom mpify_fastai import ranch\n'
             'learn = fh.sgd_learner(fh.digits_dls_plain(64, 32, bs=16), fh.mlp(0))\n'
             'def boom(): raise ValueError("user code failed")')
    nb = helpers.run_notebook([setup, *NOTEBOOK_ERRORS.values()], allow_errors=True, timeout=180)
    for (case, src), cell in zip(NOTEBOOK_ERRORS.items(), nb.cells[1:]):
        errors = helpers.cell_errors(cell)
        assert len(errors) == 1, (case, helpers.cell_output(cell))
        shown = helpers.strip_ansi('\n'.join(errors[0]['traceback']))
        frames = [l for l in shown.splitlines() if l.startswith(('File ', 'Cell In'))]
        assert 1 <= len(frames) <= 3, (case, shown)
        assert 'direct cause' not in shown or case == 'worker', (case, shown)
        assert 'During handling' not in shown, (case, shown)
