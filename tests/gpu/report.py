"""Write OUT/report.md for run.sh: each GPU test's outcome (from OUT/junit.xml), the device, and the throughput
figures (OUT/throughput.json, OUT/jpeg.json). Exits with pytest's status, or 3 when a GPU is here and a test was
skipped anyway.
Usage: python3 tests/gpu/report.py OUT PYTEST_STATUS SECONDS"""
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path

def outcomes(junit: Path) -> list[tuple[str, str, str]]:
    "(test, outcome, first line of its message) for each test case in a junit xml file."
    rows = []
    for case in ET.parse(junit).iter('testcase'):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        bad = next((c for c in case if c.tag in ('failure', 'error', 'skipped')), None)
        outcome = {None: 'passed', 'failure': 'FAILED', 'error': 'ERROR', 'skipped': 'skipped'}[getattr(bad, 'tag', None)]
        text = '' if bad is None else (bad.get('message') or bad.text or '').strip()
        rows.append((name, outcome, text.splitlines()[0][:200].replace('|', '/') if text else ''))
    return rows

def gpu_here() -> str | None:
    "The GPU's name, asked of torch in this (separate) process, or None."
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None

def main(out: str, status: str, seconds: str) -> int:
    out, status = Path(out), int(status)
    junit, tp = out / 'junit.xml', out / 'throughput.json'
    rows = outcomes(junit) if junit.exists() else []
    gpu = gpu_here()
    counts = {o: sum(r[1] == o for r in rows) for o in ('passed', 'FAILED', 'ERROR', 'skipped')}
    code = 3 if gpu and counts['skipped'] else status
    lines = ['# GPU suite report', '', f"- device: {gpu or 'no CUDA GPU here'}",
             f"- {', '.join(f'{n} {o.lower()}' for o, n in counts.items() if n) or 'no test ran'} in {seconds} s "
             f"(pytest exit {status}, this script's exit {code})", '']
    if code == 3: lines += ['**A GPU is here but tests were skipped: the suite did not see it.**', '']
    if not junit.exists(): lines += ['**No junit.xml: pytest did not finish (stopped at its time limit?); see log.txt.**', '']
    if rows: lines += ['| test | outcome | message |', '|---|---|---|', *[f'| {n} | {o} | {m} |' for n, o, m in rows], '']
    if tp.exists():
        t = json.loads(tp.read_text())
        lines += ['## Throughput', '', f"fit_ddp(nprocs=1) at {t['ratio']:.3f}x a local fit on {t['device']} (floor {t['floor']}): "
                  f"median epoch {t['ddp_epoch_s'] * 1e3:.1f} ms against {t['local_epoch_s'] * 1e3:.1f} ms; {t['model']}, "
                  f"{t['batches_per_epoch']} batches of {t['batch_size']} per epoch.", '',
                  'For bench/RESULTS.md:', '',
                  f"| GPU: `fit_ddp(nprocs=1)` vs local `fit`, {t['model']}, synthetic 3x32x32 | {t['device']} | "
                  f"{t['ratio']:.2f}x (median epoch {t['ddp_epoch_s'] * 1e3:.0f} vs {t['local_epoch_s'] * 1e3:.0f} ms) |", '']
    if (out / 'jpeg.json').exists():
        j = json.loads((out / 'jpeg.json').read_text())
        what = f"{j['model']}{', fp16' if j['fp16'] else ''}, {j['files']} JPEG files of {j['size']}x{j['size']}"
        lines += ['## JPEG pipeline', '', f"learn.ddp(nprocs=1).fine_tune({j['fine_tune_epochs']}) at {j['ratio']:.3f}x a local one on "
                  f"{j['device']} (floor {j['floor']}): median epoch 2+ {j['ddp_epoch_s']:.2f} s against {j['local_epoch_s']:.2f} s; "
                  f"first training batch {j['ddp_first_batch_s']:.2f} s after the call against {j['local_first_batch_s']:.2f} s; "
                  f"{what}, bs {j['batch_size']}, loader workers: {j['loader_workers']} (files written in {j['generate_s']} s).", '',
                  'For bench/RESULTS.md:', '',
                  f"| GPU: `learn.ddp(nprocs=1).fine_tune` vs local, {what} | {j['device']} | {j['ratio']:.2f}x (median epoch "
                  f"{j['ddp_epoch_s']:.2f} vs {j['local_epoch_s']:.2f} s; first batch {j['ddp_first_batch_s']:.2f} vs "
                  f"{j['local_first_batch_s']:.2f} s after the call) |", '']
    (out / 'report.md').write_text('\n'.join(lines))
    print('\n'.join(lines))
    return code

if __name__ == '__main__': sys.exit(main(*sys.argv[1:]))
