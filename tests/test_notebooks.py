"""The docs notebooks (nbs/), executed on a real kernel as a reader would run them: every cell runs (a cell may raise
only if tagged `raises-exception`), each code cell shows the same kinds of output as the committed one (a table, an
image, text, the error type; not the numbers), what is committed is clean of the machine that made it, and the
README says what `nbs/index.ipynb` says. The long notebooks are marked slow. `python nbs/regenerate.py` redoes them."""
from __future__ import annotations
import json, re, sys
from pathlib import Path
import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'nbs'))
import regenerate  # noqa: E402

SLOW = {'02_fit_ddp', '03_applications', '04_torchrun', '06_slurm'}   # about a minute or more each on 2 cores
NOTEBOOKS = regenerate.notebooks()
README = (REPO / 'README.md').read_text()
SETUP = 'setup'   # index's cell that hides fastai's import warning: not in the README's example

def committed(path: Path):
    return nbformat.read(path, as_version=4)

def _source(nb, i: int) -> str:
    code = [c for c in nb.cells if c.cell_type == 'code']
    return code[i].source

@pytest.mark.parametrize('path', [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.stem in SLOW else [])
                                  for p in NOTEBOOKS])
def test_notebook_runs_and_shows_what_is_committed(path, tmp_path):
    if path.stem == '06_slurm':   # it starts the test cluster of tests/slurm_cluster.py
        from slurm_cluster import unavailable
        if (why := unavailable()) is not None: pytest.skip(f"no SLURM test cluster: {why}")
    nb = regenerate.execute(path, str(tmp_path))   # raises CellExecutionError naming the cell if an untagged cell fails
    want, got = regenerate.structure(committed(path)), regenerate.structure(nb)
    assert len(got) == len(want), f"{path.name}: {len(got)} code cells run, {len(want)} committed"
    diffs = [f"cell {i} ({_source(nb, i).splitlines()[0][:60]!r}): committed {w}, now {g}"
             for i, (w, g) in enumerate(zip(want, got)) if w != g]
    assert not diffs, f"{path.name} shows other kinds of output than committed:\n" + '\n'.join(diffs)

@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_executed_and_clean(path):
    "Outputs committed, cleaned as regenerate.py cleans them: no timings, kernel facts or this machine's paths."
    nb = committed(path)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert code and all(c.execution_count == i + 1 for i, c in enumerate(code)), f"{path.name} is not executed in order"
    assert any(c.outputs for c in code)
    assert nb.metadata.get('language_info') == {'name': 'python'} and 'widgets' not in nb.metadata
    assert all(set(c.metadata) <= set(regenerate.CELL_METADATA_KEPT) for c in nb.cells), "execution metadata left in"
    text = json.dumps([c.get('outputs', []) for c in nb.cells], ensure_ascii=False)
    for noise in ('/work/', '/root/', '/home/', 'site-packages/site-packages', 'kernel-', str(REPO)):
        assert noise not in text, f"{path.name} outputs hold {noise!r}"
    assert not re.search(r'/tmp/(?!…)', text), f"{path.name} outputs hold a temporary path"
    assert not re.search(r'0x[0-9a-f]{8,}', text), f"{path.name} outputs hold an object address"
    # cleaning what is committed changes nothing: regenerate.py wrote it
    again = regenerate.clean(nbformat.from_dict(json.loads(json.dumps(nb))), '/nonexistent')
    assert again == nb

@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_error_cells_are_tagged_and_raise(path):
    "A committed error is one the notebook means to show: its cell carries `raises-exception`, and every such cell raised."
    for c in committed(path).cells:
        if c.cell_type != 'code': continue
        raised = any(o.output_type == 'error' for o in c.outputs)
        assert raised == ('raises-exception' in c.metadata.get('tags', [])), f"{path.name}: {c.source[:80]!r}"

def _pngs(nb) -> list[tuple]:
    "(code cell number, RGB pixels as ints) of every committed PNG output."
    import base64, io
    import numpy as np
    from PIL import Image
    code = [c for c in nb.cells if c.cell_type == 'code']
    return [(i, np.asarray(Image.open(io.BytesIO(base64.b64decode(o['data']['image/png']))).convert('RGB')).astype(int))
            for i, c in enumerate(code) for o in c.outputs if 'image/png' in o.get('data', {})]

@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_images_show_data(path):
    """Every committed PNG shows data, not bare axes. matplotlib draws axes, ticks and text in black and grays and data
    in the colour cycle: a plot's coloured pixels fill over 40% of the image's columns (lines across it; the colour
    swatches of an empty plot's legend, 5%), or a picture (show_batch, show_results) is over 10% dark (bare axes: 1.3%)."""
    nb = committed(path)
    for i, im in _pngs(nb):
        coloured_cols, dark = float(((im.max(-1) - im.min(-1)) > 50).any(0).mean()), float((im.max(-1) < 128).mean())
        assert coloured_cols > 0.4 or dark > 0.1, (f"{path.name}, code cell {i} ({_source(nb, i).splitlines()[0][:60]!r}): "
                                                   f"an image without data (coloured columns {coloured_cols:.1%}, dark {dark:.1%})")

# ---------------------------------------------------------------- README and index agree

def readme_section(title: str) -> str:
    m = re.search(rf'^## {re.escape(title)}\n(.*?)(?=^## |\Z)', README, re.S | re.M)
    assert m, f"README has no section {title!r}"
    return f'## {title}\n{m.group(1)}'.strip()

def _norm(s: str) -> str: return ' '.join(s.split())

def test_readme_and_index_say_the_same():
    """index.ipynb's markdown is the README's opening, requirements and install, three-line example and notebook list
    (links made relative to nbs/); its example cells are the README's example code, after a `setup` cell of its own."""
    index = committed(REPO / 'nbs' / 'index.ipynb')
    md = [c.source for c in index.cells if c.cell_type == 'markdown']
    intro = README[:README.index('\n## ')].strip()
    three = readme_section('In three lines')
    notebooks = readme_section('Learn it from the notebooks').replace('](nbs/', '](').replace('](nbs)', '](.)')
    want = [intro, readme_section('Requirements and install'), three[:three.index('```python')].strip(), notebooks]
    assert [_norm(m) for m in md] == [_norm(w) for w in want]
    example = re.search(r'```python\n(.*?)```', three, re.S).group(1)
    tagged = [i for i, c in enumerate(index.cells) if regenerate.SCREENSHOT_CELL_TAG in c.metadata.get('tags', [])]
    assert len(tagged) == 1
    cells = [c.source for c in index.cells[:tagged[0] + 1]
             if c.cell_type == 'code' and SETUP not in c.metadata.get('tags', [])]
    assert _norm('\n'.join(cells)) == _norm(example)

def test_readme_commands_are_the_ones_ci_runs():
    "The install section's two commands: the demo and the tests; .ci/run takes the second from the README."
    setup = readme_section('Requirements and install')
    assert '    pip install -e . && python -m mpify_fastai.demo' in setup
    assert '    pip install -e ".[dev]" && pytest' in setup
    assert (REPO / 'nbs' / 'images' / 'progress_table.png').exists(), "the README's screenshot: python nbs/regenerate.py index"
