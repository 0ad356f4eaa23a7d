"""The supported range: the Learner methods on every fastai in it, one clear error outside it, settings.ini declaring the
same bounds, the environment report, and the built wheel working without the repository."""
import configparser, re, subprocess, sys, venv, zipfile
from pathlib import Path
import pytest
import helpers
from mpify_fastai.versions import SUPPORTED, installed_version

REPO = Path(__file__).resolve().parents[1]

def _python(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=180, cwd=tmp_path,
                          env=helpers.subprocess_env(**env))

@pytest.mark.parametrize('order', ['fastai_first', 'mpify_first'])
def test_learner_methods_are_added_on_this_fastai(tmp_path, order):
    "Learner.fit_ddp/.ddp/.save_ddp_job/.load_ddp_result exist in either import order (fastcore 1.7 has no patch_to(nm=))."
    imports = ['from fastai.learner import Learner', 'import mpify_fastai']
    if order == 'mpify_first': imports.reverse()
    r = _python('\n'.join(imports + ["print([getattr(Learner, m).__qualname__ for m in ('fit_ddp', 'ddp', 'save_ddp_job', "
                                     "'load_ddp_result')])"]), tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split('\n')[0] == "['Learner.fit_ddp', 'Learner.ddp', 'Learner.save_ddp_job', 'Learner.load_ddp_result']"
    assert 'could not' not in r.stderr

def _fake_distribution(folder: Path, name: str, version: str) -> Path:
    "A real distribution record (dist-info) of `name` at `version`, found first on the path by importlib.metadata."
    info = folder / f'{name}-{version}.dist-info'
    info.mkdir(parents=True)
    (info / 'METADATA').write_text(f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n')
    return folder

@pytest.mark.parametrize('name,version', [('fastai', '2.6.3'), ('torch', '2.15.0'), ('fastai', '2.9.0')])
def test_outside_the_range_import_raises_one_clear_error(tmp_path, name, version):
    "An installed version outside the range: `import mpify_fastai` raises naming it and the range; the escape hatch warns."
    meta = _fake_distribution(tmp_path / 'meta', name, version)
    path = f"{meta}:{REPO}:{REPO / 'tests'}"
    r = _python('import mpify_fastai', tmp_path, PYTHONPATH=path)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith('mpify_fastai.versions.UnsupportedVersionError: ')
    assert f'{name} {version} (supported: >= ' in last and 'Python 3.10-3.13, torch 2.6-2.14 and fastai 2.7.19-2.8' in last
    assert len(r.stderr.splitlines()) < 12, r.stderr
    r = _python('import mpify_fastai; print(mpify_fastai.ranch)', tmp_path, PYTHONPATH=path, MPIFY_ALLOW_UNTESTED='1')
    assert r.returncode == 0 and 'function ranch' in r.stdout and f'{name} {version}' in r.stderr

def test_settings_declare_the_tested_range():
    "settings.ini's requirements and Python bounds are the range `versions.SUPPORTED` checks, no wider."
    cfg = configparser.ConfigParser(); cfg.read(REPO / 'settings.ini')
    d = cfg['DEFAULT']
    reqs = dict(re.match(r'([A-Za-z_.-]+)(.*)', r).groups() for r in d['requirements'].split())
    for name in ('fastai', 'torch'):
        low, high = SUPPORTED[name]
        assert reqs[name] == f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
    low, high = SUPPORTED['python']
    assert (d['min_python'], d['max_python']) == (f'{low[0]}.{low[1]}', f'{high[0]}.{high[1] - 1}')
    assert d['license'] == 'apache2' and 'Apache License' in (REPO / 'LICENSE').read_text()[:200]

def test_environment_report_names_what_a_bug_report_needs(tmp_path):
    r = subprocess.run([sys.executable, '-m', 'mpify_fastai.env'], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env=helpers.subprocess_env())
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    rows = dict(re.match(r'(.+?)\s+: (.*)', l).groups() for l in r.stdout.splitlines())
    for name in ('torch', 'fastai', 'fastcore', 'multiprocess', 'dill', 'submitit'):
        assert rows[name] == (installed_version(name) or 'not installed')
    assert rows['python'].startswith('.'.join(map(str, sys.version_info[:3])))
    for key in ('torch CUDA build', 'GPUs visible (NVML)', 'GPUs (nvidia-smi)', '/dev/shm', 'start method', 'supported range'):
        assert rows[key], key
    assert re.match(r'[\d.]+ GiB free of [\d.]+ GiB', rows['/dev/shm'])

def test_wheel_installs_without_the_repository_and_runs_the_demo(tmp_path):
    "`pip wheel .` holds every module; installed in a fresh environment (no repository on its path), the demo runs."
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '-q', '-w', tmp_path / 'dist', REPO], check=True,
                   capture_output=True, timeout=300)
    wheel, = (tmp_path / 'dist').glob('mpify_fastai-*.whl')
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {f'mpify_fastai/{p.name}' for p in (REPO / 'mpify_fastai').glob('*.py')}
    assert modules <= names and any(n.endswith('/LICENSE') for n in names), sorted(modules - names)
    env_dir = tmp_path / 'env'
    venv.create(env_dir, with_pip=False)
    py = env_dir / 'bin' / 'python'
    site = subprocess.run([py, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'], capture_output=True, text=True,
                          check=True).stdout.strip()
    deps = subprocess.run([sys.executable, '-c', 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))'],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, 'deps.pth').write_text(deps + '\n')   # torch, fastai, ... from this environment; its .pth files (the editable install) are not run
    subprocess.run([sys.executable, '-m', 'pip', '--python', py, 'install', '--no-deps', '-q', wheel], check=True,
                   capture_output=True, timeout=300)
    env = {k: v for k, v in helpers.subprocess_env().items() if k != 'PYTHONPATH'}
    r = subprocess.run([py, '-c', 'import mpify_fastai; print(mpify_fastai.__file__)'], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120)
    assert r.stdout.strip().startswith(str(env_dir)), (r.stdout, r.stderr)
    r = subprocess.run([py, '-m', 'mpify_fastai.demo'], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'accuracy' in r.stdout
