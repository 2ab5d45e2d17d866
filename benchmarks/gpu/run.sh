#!/usr/bin/env bash
# The GPU proof in one call on a lent H100/H200 (see benchmarks/README.md, "GPU figures", for the exact call of
# the device tool):
#
#   bash benchmarks/gpu/run.sh                         # all steps, results under $OUT
#   bash benchmarks/gpu/run.sh --steps attention_n6    # rerun some steps
#   bash benchmarks/gpu/run.sh --dry-run --out /tmp/x  # here, on CPU, tiny shapes (tests/test_gpu_script.py)
#
# Checks the wheels carried in .whl/ (benchmarks/gpu/fetch_wheels.sh fetches them; another folder:
# $MASK2DIT_WHEELS) against benchmarks/gpu/wheels.txt and, on a GPU, refuses to start (one line on stderr,
# exit 2) if one is missing or of another version: without them every step would fail after its imports.
# Installs them into $MASK2DIT_SITE (default /tmp/site), checks the installed versions, puts them and src/
# first on PYTHONPATH, then runs benchmarks/gpu/run.py with the same arguments. A dry run without wheels uses
# the installed packages.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
PYTHON=${PYTHON:-python3}
site=${MASK2DIT_SITE:-/tmp/site}
folder=${MASK2DIT_WHEELS:-.whl}
refuse() { echo "run.sh: refusing to start: $*" >&2; exit 2; }
dry_run=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry_run=1; done

specs=() wheels=() problems=()
while read -r spec; do
    [[ -z "$spec" || "$spec" == \#* ]] && continue
    specs+=("$spec")
    name=${spec%%==*} version=${spec##*==}
    found=("$folder/${name//-/_}"-*.whl)
    if [ ! -e "${found[0]}" ]; then
        problems+=("$name $version is missing")
    elif [ "${#found[@]}" -gt 1 ]; then
        problems+=("${#found[@]} wheels of $name (one only: $version)")
    elif [[ "$(basename "${found[0]}")" != "${name//-/_}-$version-"* ]]; then
        problems+=("$(basename "${found[0]}") is not $name $version")
    else
        wheels+=("${found[0]}")
    fi
done < benchmarks/gpu/wheels.txt

if [ "$dry_run" = 1 ] && [ "${#wheels[@]}" = 0 ]; then
    echo "no wheels in $folder/: using the installed packages (a dry run only)"
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
    [ "${#problems[@]}" = 0 ] || refuse "carried wheels in $folder/: $(IFS=';'; echo "${problems[*]}" | sed 's/;/; /g') (benchmarks/gpu/fetch_wheels.sh fetches them; name \`.whl\` in the device call's carry)"
    echo "installing ${#wheels[@]} carried wheels into $site: ${wheels[*]}"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}" \
        || refuse "installing the carried wheels into $site failed"
    export PYTHONPATH="$site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    # the versions Python finds first (no import: a second at most)
    wrong=$("$PYTHON" -c 'import importlib.metadata as m, sys
print("; ".join(f"{n} {m.version(n)} is found first, not {v}" for n, v in (s.split("==") for s in sys.argv[1:]) if m.version(n) != v))' "${specs[@]}") \
        || refuse "could not read the installed versions"
    [ -z "$wrong" ] || refuse "$wrong"
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu/run.py "$@"
