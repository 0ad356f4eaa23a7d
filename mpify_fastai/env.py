"""What a bug report needs: `python -m mpify_fastai.env` (or `mpify_fastai.show_install()`) prints the versions, GPUs,
start method and /dev/shm room of this environment. It never creates a CUDA context (GPUs are read through NVML)."""
from __future__ import annotations
import os, platform, shutil, subprocess, sys
from .versions import installed_version, unsupported

__all__ = ['environment_report', 'show_install']

_PACKAGES = ('torch', 'torchvision', 'fastai', 'fastcore', 'fastprogress', 'multiprocess', 'dill', 'cloudpickle', 'numpy',
             'pandas', 'submitit', 'ipykernel', 'psutil')

def _gib(n: float) -> str: return f"{n / 2**30:.1f} GiB"

def _gpus() -> list[str]:
    "Each visible GPU as nvidia-smi names it (name, memory, driver), without touching CUDA from this process."
    if shutil.which('nvidia-smi') is None: return []
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=index,name,memory.total,driver_version', '--format=csv,noheader'],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired): return []
    return [l.strip() for l in out.splitlines() if l.strip()]

def _torch_build() -> dict[str, str]:
    "torch's CUDA and NCCL build versions and its distributed backends, read without initialising CUDA."
    if 'torch' not in sys.modules and installed_version('torch') is None: return {}
    import torch, torch.distributed as dist
    from .group import visible_gpu_count
    backends = [b for b in ('gloo', 'nccl', 'mpi') if dist.is_available() and getattr(dist, f'is_{b}_available')()]
    nccl = '.'.join(map(str, torch.cuda.nccl.version())) if 'nccl' in backends else 'n/a'
    return {'torch CUDA build': torch.version.cuda or 'none (CPU build)', 'NCCL': nccl,
            'distributed backends': ', '.join(backends) or 'none', 'GPUs visible (NVML)': str(visible_gpu_count()),
            'CUDA_VISIBLE_DEVICES': os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}

def environment_report() -> dict[str, str]:
    "The report as name -> value, in the order it prints."
    from . import __version__
    from .files import shm_root
    rep = {'mpify_fastai': __version__, 'python': f"{platform.python_version()} ({sys.executable})",
           'platform': platform.platform()}
    rep.update({p: installed_version(p) or 'not installed' for p in _PACKAGES})
    rep.update(_torch_build())
    rep['GPUs (nvidia-smi)'] = '; '.join(_gpus()) or 'none'
    rep['CPU cores usable'] = str(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count())
    shm = shm_root()
    st = os.statvfs(shm)
    rep['/dev/shm'] = (f"{_gib(st.f_bavail * st.f_frsize)} free of {_gib(st.f_blocks * st.f_frsize)}"
                       + ('' if shm == '/dev/shm' else f" (none writable: {shm} is used)"))
    rep['start method'] = 'warm (default; MPIFY_PREWARM=0 turns the background start off)'
    rep['in a notebook'] = str('ipykernel' in sys.modules)
    mpify = {k: v for k, v in os.environ.items() if k.startswith(('MPIFY_', 'NCCL_', 'GLOO_', 'OMP_NUM_THREADS'))}
    rep['environment'] = ', '.join(f"{k}={v}" for k, v in sorted(mpify.items())) or '(no MPIFY_/NCCL_/GLOO_/OMP variables)'
    rep['supported range'] = '; '.join(unsupported()) or 'all within the tested range'
    return rep

def show_install() -> None:
    "Print the environment report: paste it into a bug report."
    rep = environment_report()
    width = max(map(len, rep))
    print('\n'.join(f"{k:<{width}} : {v}" for k, v in rep.items()))

if __name__ == '__main__': show_install()
