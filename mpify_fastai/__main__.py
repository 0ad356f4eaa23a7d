"""`python -m mpify_fastai run job.pkl --result result.pth`: run a saved training job, one process per rank
(start it with torchrun, which provides RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous)."""
from __future__ import annotations
import argparse, sys

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m mpify_fastai', description=__doc__)
    sub = p.add_subparsers(dest='cmd', required=True)
    r = sub.add_parser('run', help='train a job saved with learn.save_ddp_job (under torchrun)')
    r.add_argument('job', help='job file written by learn.save_ddp_job (a pickle: run only files you trust)')
    r.add_argument('--result', required=True, help='where rank 0 writes the trained result (atomically)')
    r.add_argument('--checkpoint', help='per-epoch checkpoint for resuming after a restart (default: RESULT.ckpt)')
    a = p.parse_args(argv)
    from .jobfile import JobFileError, check_job_file, check_result_path
    try:
        check_job_file(a.job); check_result_path(a.result)      # before importing torch/fastai: refuse at once
        from .job import run_job
        run_job(a.job, a.result, a.checkpoint)
    except JobFileError as e:
        print(f"mpify_fastai: {e}", file=sys.stderr)
        return 2
    return 0

if __name__ == '__main__': raise SystemExit(main())
