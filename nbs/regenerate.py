"""Execute the docs notebooks on a real kernel and write their outputs back, cleaned of this machine's noise; then
redo the README's screenshot of the live progress table (headless Chromium, Debian's `chromium` package).

    python nbs/regenerate.py                  # every notebook in nbs/, then the screenshot
    python nbs/regenerate.py 01_ranch         # only the notebooks named (the screenshot only with `index`)

`tests/test_notebooks.py` executes the committed notebooks the same way and compares their `structure`.
"""
from __future__ import annotations
import argparse, re, shutil, site, subprocess, sys, sysconfig, tempfile
from pathlib import Path

NBS = Path(__file__).resolve().parent
REPO = NBS.parent
sys.path.insert(0, str(REPO / 'tests'))
from helpers import execute_notebook  # noqa: E402  (the test suite's kernel set-up: this interpreter's python3)

SCREENSHOT = NBS / 'images' / 'progress_table.png'
SCREENSHOT_CELL_TAG = 'screenshot'     # the index cell whose input and output the README shows
CELL_METADATA_KEPT = ('tags',)

def notebooks(names=()) -> list[Path]:
    "The docs notebooks, in reading order; `names` picks some by stem."
    found = sorted(NBS.glob('*.ipynb'), key=lambda p: (p.stem != 'index', p.stem))
    if not names: return found
    missing = set(names) - {p.stem for p in found}
    if missing: raise SystemExit(f"no notebook named {sorted(missing)} in {NBS} (have {[p.stem for p in found]})")
    return [p for p in found if p.stem in names]

def execute(path: Path, workdir: str, timeout: int = 600):
    """`path` read and executed, its kernel working in `workdir`. A cell may raise only if tagged
    `raises-exception` (Jupyter's own tag, which nbclient honours)."""
    import nbformat
    nb = nbformat.read(path, as_version=4)
    return execute_notebook(nb, workdir, timeout, record_timing=False)

def _replacements(workdir: str) -> list[tuple[str, str]]:
    "Absolute prefixes of this machine, longest first, and what a reader sees instead."
    pairs = [(str(Path(workdir).resolve()), '.'), (workdir, '.'), (str(REPO) + '/', 'site-packages/')]
    for sp in {*site.getsitepackages(), sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']}:
        pairs.append((sp.rstrip('/') + '/', 'site-packages/'))
    pairs += [(sysconfig.get_paths()['stdlib'].rstrip('/') + '/', f'python{sys.version_info[0]}.{sys.version_info[1]}/'),
              (str(Path.home()), '~')]
    return sorted(set(pairs), key=lambda p: -len(p[0]))

_TMP = re.compile(r"/tmp/[^\s'\"),\]:]+")
_ADDRESS = re.compile(r'0x[0-9a-f]{8,}')

def scrub(text: str, replacements) -> str:
    "`text` without this machine's paths, temporary folder names and object addresses."
    for old, new in replacements: text = text.replace(old, new)
    return _ADDRESS.sub('0x…', _TMP.sub('/tmp/…', text))

def _scrub_output(out, replacements) -> None:
    if 'text' in out: out['text'] = scrub(out['text'], replacements)
    if 'traceback' in out: out['traceback'] = [scrub(t, replacements) for t in out['traceback']]
    if 'evalue' in out: out['evalue'] = scrub(out['evalue'], replacements)
    for mime, value in out.get('data', {}).items():
        if isinstance(value, str) and not mime.startswith('image/'): out['data'][mime] = scrub(value, replacements)
    out.get('metadata', {}).pop('transient', None)

def clean(nb, workdir: str):
    "Execution noise out of an executed notebook: timings, kernel and version facts, this machine's paths."
    replacements = _replacements(workdir)
    nb.metadata = dict(kernelspec=dict(name='python3', display_name='Python 3', language='python'),
                       language_info=dict(name='python'))
    count = 0
    for cell in nb.cells:
        cell.metadata = {k: v for k, v in cell.metadata.items() if k in CELL_METADATA_KEPT}
        if cell.cell_type != 'code': continue
        count += 1
        cell.execution_count = count
        for out in cell.outputs:
            _scrub_output(out, replacements)
            if 'execution_count' in out: out['execution_count'] = count
    return nb

def structure(nb) -> list[list[str]]:
    """What each code cell shows, without its numbers: a sorted list of 'stdout', 'stderr', 'table', 'image',
    'value' (any other result) and 'error:<type>' per cell."""
    shapes = []
    for cell in nb.cells:
        if cell.cell_type != 'code': continue
        kinds = set()
        for out in cell.outputs:
            kind = out['output_type']
            if kind == 'stream': kinds.add(out['name'])
            elif kind == 'error': kinds.add(f"error:{out['ename']}")
            else:
                data = out.get('data', {})
                if any(m.startswith('image/') for m in data): kinds.add('image')
                elif '<table' in data.get('text/html', ''): kinds.add('table')
                elif data: kinds.add('value')
        shapes.append(sorted(kinds))
    return shapes

def screenshot(nb, dest: Path = SCREENSHOT, width: int = 900) -> Path:
    """The `screenshot`-tagged cell of the executed notebook `nb`, exported to HTML by nbconvert and rendered by
    headless Chromium, trimmed to its content, at `dest`."""
    import nbformat
    from nbconvert import HTMLExporter
    from PIL import Image, ImageChops
    browser = shutil.which('chromium') or shutil.which('chromium-browser')
    if browser is None: raise SystemExit("no chromium on PATH: `apt-get install chromium` (Debian's package)")
    cells = [c for c in nb.cells if SCREENSHOT_CELL_TAG in c.metadata.get('tags', [])]
    if len(cells) != 1: raise SystemExit(f"expected one cell tagged {SCREENSHOT_CELL_TAG!r}, found {len(cells)}")
    page = nbformat.v4.new_notebook(cells=cells, metadata=nb.metadata)
    html, _ = HTMLExporter(template_name='lab').from_notebook_node(page)
    with tempfile.TemporaryDirectory(prefix='mpify-screenshot-') as tmp:
        src, png = Path(tmp, 'page.html'), Path(tmp, 'page.png')
        src.write_text(html)
        subprocess.run([browser, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars',
                        f'--window-size={width},2000', f'--screenshot={png}', src.as_uri()],
                       check=True, capture_output=True, timeout=120)
        image = Image.open(png).convert('RGB')
        box = ImageChops.difference(image, Image.new('RGB', image.size, (255, 255, 255))).getbbox()
        pad = 12
        image = image.crop((0, max(box[1] - pad, 0), width, min(box[3] + pad, image.height)))
        dest.parent.mkdir(parents=True, exist_ok=True)
        image.save(dest, optimize=True)
    return dest

def regenerate(path: Path, timeout: int = 600):
    "Execute `path` in a fresh folder, clean it and write it back; returns the executed notebook."
    import nbformat
    with tempfile.TemporaryDirectory(prefix=f'mpify-nb-{path.stem}-') as workdir:
        nb = clean(execute(path, workdir, timeout), workdir)
    nbformat.write(nb, path)
    return nb

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('names', nargs='*', help='notebook stems (default: all)')
    p.add_argument('--no-screenshot', action='store_true', help='leave nbs/images/progress_table.png as it is')
    a = p.parse_args(argv)
    for path in notebooks(a.names):
        print(f'executing {path.name} ...', flush=True)
        nb = regenerate(path)
        if path.stem == 'index' and not a.no_screenshot: print(f'wrote {screenshot(nb).relative_to(REPO)}')
    return 0

if __name__ == '__main__':
    raise SystemExit(main())
