#!/usr/bin/env bash
# Download, here, the wheels the GPU machine lacks (it reaches no package index) into <repo>/.whl/, for run.sh.
# The GPU image has torch, torchvision, numpy, pandas, scikit-learn, scipy, matplotlib, pillow, pytest, pytest-timeout,
# psutil, cloudpickle, requests, pyyaml, rich, packaging, pygments, attrs, anyio, typing-extensions, python-dateutil
# (.library/device/KINDS.md); these are the rest of what this package (fastai, multiprocess) and its notebook tests
# (nbclient, ipykernel) import. Pure-Python wheels come as py3-none-any; the others are CPython-$PYVER manylinux x86_64.
#   bash tests/gpu/fetch_wheels.sh                        # -> .whl/ for the GPU machine's Python 3.12
#   PYVER=3.11 DEST=/tmp/whl311 bash tests/gpu/fetch_wheels.sh   # the same set for another Python (a local dry run)
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${DEST:-.whl}
pyver=${PYVER:-3.12}
wheels=(
  # this package
  fastai==2.8.12 fastcore==2.2.41 fasttransform==0.0.5 fastprogress==1.1.6 fastdownload==0.0.8
  plum-dispatch==2.9.0 beartype==0.23.1
  python-fasthtml==0.14.14 starlette==1.10.0 itsdangerous==2.2.0 python-multipart==0.0.34 sniffio==1.3.1
  multiprocess==0.70.19 dill==0.4.1
  # the notebook tests: nbclient and a kernel
  nbclient==0.11.0 nbformat==5.11.1 fastjsonschema==2.22.3 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  referencing==0.37.0 rpds-py==0.30.0 jupyter-client==8.10.0 jupyter-core==5.9.1 platformdirs==4.14.8
  pyzmq==27.3.0 tornado==6.6.1 traitlets==5.15.0
  ipykernel==7.4.0 comm==0.2.3 nest-asyncio2==1.7.4 matplotlib-inline==0.2.2
  ipython==9.18.1 ipython-pygments-lexers==1.1.1 decorator==5.2.1 jedi==0.20.0 parso==0.8.7 pexpect==4.8.0
  ptyprocess==0.7.0 prompt-toolkit==3.0.52 wcwidth==0.7.0 stack-data==0.6.3 asttokens==3.0.1 executing==2.2.1
  pure-eval==0.2.3
)
mkdir -p "$dest"
grep -qxF /.whl/ .git/info/exclude || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "${wheels[@]}"
echo "$(ls "$dest"/*.whl | wc -l) wheels, $(du -sh "$dest" | cut -f1) in $dest"
