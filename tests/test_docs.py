"""The README quotes what the code prints: every `mpify_fastai: ...` line it quotes is made here by the code that prints
it (the interrupt line, the restart line, the finished job's line), and must equal it; `<...>` in a quote stands for
text that varies (an error's first line). The quoted lines that a user acts on must be in the README."""
from __future__ import annotations
import re
from pathlib import Path
import pytest
import torch
from test_job import RUN, no_strays, rdzv, torchrun  # noqa: F401  (no_strays: a fixture)

REPO = Path(__file__).resolve().parents[1]
README = (REPO / 'README.md').read_text()
MUST_QUOTE = ('mpify_fastai: stopped with ', '; restart 1 of ', 'mpify_fastai: this job already finished: ')

def quoted_messages(text: str) -> list[str]:
    "The README's inline-code quotes of a message, as one line (a quote may wrap across lines)."
    return [' '.join(q.split()) for q in re.findall(r'`(mpify_fastai: [^`]+)`', text)]

def matches(quote: str, printed: str) -> bool:
    pattern = ''.join(re.escape(part) if i % 2 == 0 else '.+' for i, part in enumerate(re.split(r'(<[^>]+>)', quote)))
    return re.fullmatch(pattern, printed) is not None

def _learner():
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from mpify_fastai.demo import digits_cnn, digits_dls
    return Learner(digits_dls(), digits_cnn(), loss_func=CrossEntropyLossFlat())

def interrupt_line(capsys) -> str:
    "What a Ctrl-C prints when fit_one_cycle(10) has 3 epochs done: the checkpoint such a run leaves, applied."
    from mpify_fastai.recovery import stopped_at_checkpoint
    from mpify_fastai.state import learner_result
    learn = _learner()
    ck = {**learner_result(learn), 'completed_epoch': 2, 'n_epoch': 10}
    capsys.readouterr()
    stopped_at_checkpoint(learn, ck, 'fit_one_cycle', (10,))
    return capsys.readouterr().out.strip()

def restart_line(tmp_path) -> str:
    "What `max_restarts=2` prints when rank 1 is killed in fit_one_cycle(10) with 3 epochs checkpointed."
    from mpify_fastai.errors import WorkerDied
    from mpify_fastai.recovery import with_restarts
    ck = tmp_path / 'last_epoch.pth'
    torch.save({'completed_epoch': 2, 'n_epoch': 10}, ck)
    said = []
    def attempt(resumed, restart):
        if restart == 0: raise WorkerDied(1, -9)
        return resumed
    assert with_restarts(attempt, str(ck), 'fit_one_cycle', 2, lambda msg, epoch: said.append(msg))['completed_epoch'] == 2
    return said[0]

def finished_line(tmp_path) -> str:
    "What torchrun prints when this job's result is already at `--result`: the job file run for real, one process."
    from helpers import free_port
    from mpify_fastai.jobfile import job_digest
    job = _learner().save_ddp_job(tmp_path / 'job.pkl', 1)
    torch.save({'job_digest': job_digest(job.read_bytes())}, tmp_path / 'result.pth')
    [(rc, out)] = torchrun([(rdzv(free_port(), 1, 1, *RUN), tmp_path)], tmp_path, timeout=120)
    assert rc == 0, out[-3000:]
    return next(l for l in out.splitlines() if 'already finished' in l)

@pytest.mark.usefixtures('no_leftovers', 'no_strays')
def test_readme_quotes_the_messages_the_code_prints(tmp_path, capsys):
    printed = [interrupt_line(capsys), restart_line(tmp_path), finished_line(tmp_path)]
    quotes = quoted_messages(README)
    for must in MUST_QUOTE:
        assert any(must in q for q in quotes), f"the README quotes no line with {must!r}; the code prints:\n" + '\n'.join(printed)
    wrong = [q for q in quotes if not any(matches(q, p) for p in printed)]
    assert not wrong, "the README quotes lines the code does not print:\n" + '\n'.join(wrong) + \
        "\n\nthe code prints:\n" + '\n'.join(printed)

def test_quote_matching():
    assert matches('mpify_fastai: <why>; restart 1 of 2', 'mpify_fastai: rank 1 was killed; restart 1 of 2')
    assert not matches('mpify_fastai: <why>; restart 1 of 2', 'mpify_fastai: rank 1 was killed; restart 1 of 3')
    assert quoted_messages('a `mpify_fastai: stopped\n  with 3` b') == ['mpify_fastai: stopped with 3']

def test_every_message_counts_epochs_one_way(capsys):
    "A count of epochs done, then the rows it covers (numbered from 0), then where training goes on: start_epoch=count."
    from mpify_fastai.progress import epochs_done
    from mpify_fastai.recovery import stopped_at_checkpoint
    from mpify_fastai.state import learner_result
    assert [epochs_done(0), epochs_done(1, 4), epochs_done(2), epochs_done(3, 10)] == [
        '0 epochs done', '1 of 4 epochs done (epoch 0)', '2 epochs done (epochs 0-1)', '3 of 10 epochs done (epochs 0-2)']
    learn = _learner()
    ck = {**learner_result(learn), 'completed_epoch': 0, 'n_epoch': 4}
    capsys.readouterr()
    stopped_at_checkpoint(learn, None, 'fit', (4,))
    stopped_at_checkpoint(learn, ck, 'fit', (4, 1e-2))
    stopped_at_checkpoint(learn, ck, 'fine_tune', (4,))   # its two fits count epochs apart: no count, no start_epoch
    assert capsys.readouterr().out.splitlines() == [
        "mpify_fastai: stopped before epoch 0 ended; the Learner is as it was",
        "mpify_fastai: stopped with 1 of 4 epochs done (epoch 0); the Learner holds them; to go on: "
        "learn.ddp(...).fit(4, 0.01, ..., start_epoch=1)",
        "mpify_fastai: stopped during fine_tune; the Learner holds its last completed epoch; fine_tune cannot skip epochs: "
        "run it again, or go on with learn.ddp(...).fit_one_cycle(...)"]

def test_readme_lines_fit_a_screen():
    "The README reads on GitHub and in a terminal without sideways scrolling."
    long = [f"{i}: {l[:60]}..." for i, l in enumerate(README.splitlines(), 1) if len(l) > 120]
    assert not long, "README lines over 120 characters:\n" + '\n'.join(long)
