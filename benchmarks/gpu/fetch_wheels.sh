#!/usr/bin/env bash
# Fetch (here, where PyPI is reachable) the wheels that benchmarks/gpu/run.sh installs on the lent GPU machine
# into .whl/ at the repository root (git ignores it; the device tool carries it when `carry` names it).
#
# The machine's image (/work/.library/device/KINDS.md) has Python 3.12, torch 2.11, transformers 5.17.0,
# huggingface_hub 1.33.0, accelerate 1.15.0, safetensors 0.8.0, tokenizers 0.23.2, sentencepiece 0.2.2, peft
# (version not recorded), pytest, numpy, pillow, pyyaml, imageio, but no diffusers. So:
#   diffusers 0.42.1  missing there; the version tested here. Needs huggingface-hub>=1.32 (1.33.0 there),
#                     safetensors>=0.8 (there), importlib_metadata (only below Python 3.8), filelock, numpy,
#                     regex, requests, Pillow (all there).
#   peft 0.21.2       the version tested here (the image's version is unknown); needs transformers, accelerate,
#                     huggingface_hub, safetensors, psutil, pyyaml, tqdm, packaging (all there).
# Not carried: transformers 5.25 (tested here) would need huggingface_hub>=2.4, which needs httpx2 and its own
# chain, absent there; the image's transformers 5.17.0 + huggingface_hub 1.33.0 run this package (checked here
# with exactly those versions, see benchmarks/README.md). imageio-ffmpeg (a 30 MB ffmpeg binary): no GPU step
# writes a video.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
mapfile -t WHEELS < <(grep -v "^#" benchmarks/gpu/wheels.txt | grep .)  # run.sh requires exactly these
LIMIT_MIB=48  # the device tool carries at most 64 MiB with the working tree
if ! git check-ignore -q .whl/probe.whl; then
    echo "/.whl/" >> "$(git rev-parse --git-common-dir)/info/exclude"
fi
mkdir -p .whl
for spec in "${WHEELS[@]}"; do  # one version of each name: two stop the install there
    rm -f ".whl/${spec%%==*}-"*.whl
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
ls -l .whl/*.whl
echo "total: $((total / 1024)) KiB in $(ls .whl/*.whl | wc -l) wheels"
if [ "$total" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
    echo "fetch_wheels.sh: .whl/ holds more than $LIMIT_MIB MiB; the device tool carries 64 MiB in all" >&2
    exit 1
fi
