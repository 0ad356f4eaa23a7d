#!/usr/bin/env bash
# The GPU suite in one command, for a short GPU lease:  bash tests/gpu/run.sh OUT_DIR   (or with $OUT set)
# Where fastai, multiprocess, nbclient or ipykernel is missing (the GPU image has none), installs the wheels of .whl/
# (made beforehand by tests/gpu/fetch_wheels.sh where a package index is reachable; WHEELS=DIR to take them from DIR)
# into /tmp/site. Runs pytest on tests/gpu and tests/test_gpu_readiness.py from this checkout, installed or not, and
# writes OUT_DIR/report.md (each test's outcome, the device, the throughput figures) beside log.txt, junit.xml,
# throughput.json and jpeg.json. Exit status: pytest's; 3 if a GPU is here but tests were skipped; 2 for a bad start.
set -u
cd "$(dirname "$0")/../.."
[ -n "${1:-${OUT:-}}" ] || { echo "usage: bash tests/gpu/run.sh OUT_DIR (or set OUT)"; exit 2; }
out=$(realpath -m "${1:-$OUT}")
wheels=${WHEELS:-.whl}
mkdir -p "$out"
start=$SECONDS
if ! python3 -c 'import fastai, multiprocess, nbclient, ipykernel' 2>/dev/null; then
  compgen -G "$wheels/*.whl" >/dev/null || { echo "no wheels in $wheels: run tests/gpu/fetch_wheels.sh first"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
echo "packages ready in $((SECONDS - start)) s" | tee "$out/log.txt"
export PYTHONUNBUFFERED=1 MPIFY_GPU_REPORT_DIR=$out
timeout -k 10 480 python3 -m pytest tests/gpu tests/test_gpu_readiness.py -rA --timeout=150 --junitxml="$out/junit.xml" 2>&1 \
  | tee -a "$out/log.txt"
status=${PIPESTATUS[0]}
python3 tests/gpu/report.py "$out" "$status" "$((SECONDS - start))"
