#!/usr/bin/env bash
# Issue 12's GPU proof in one call on a lent H100/H200 (see benchmarks/README.md, "GPU figures", for the exact
# call of the device tool):
#
#   bash benchmarks/gpu/run.sh                         # all steps, JSON under $OUT
#   bash benchmarks/gpu/run.sh --steps attention_n6    # rerun some steps
#   bash benchmarks/gpu/run.sh --dry-run --out /tmp/x  # here, on CPU, tiny shapes (tests/test_gpu_script.py)
#
# Installs the pure-Python wheels carried in .whl/ (benchmarks/gpu/fetch_wheels.sh fetches them; another folder:
# $MASK2DIT_WHEELS) into $MASK2DIT_SITE (default /tmp/site), puts them and src/ first on PYTHONPATH, then runs
# benchmarks/gpu/run.py with the same arguments. With no wheels the installed packages are used.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
PYTHON=${PYTHON:-python3}
site=${MASK2DIT_SITE:-/tmp/site}
wheels=("${MASK2DIT_WHEELS:-.whl}"/*.whl)
if [ -e "${wheels[0]}" ]; then
    echo "installing ${#wheels[@]} carried wheels into $site: ${wheels[*]}"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}" \
        || { echo "run.sh: installing the carried wheels failed" >&2; exit 3; }
    export PYTHONPATH="$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no wheels in ${MASK2DIT_WHEELS:-.whl}/: using the installed packages"
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu/run.py "$@"
