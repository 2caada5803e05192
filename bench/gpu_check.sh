#!/usr/bin/env bash
# One device-machine run (the `device` tool of the tool library): kvbm's `gpu` tests, then the
# G1<->G2 figures of bench/offload_bandwidth.py against a same-run torch copy_.
#
# The device image has torch (CUDA), numpy, msgpack, xxhash, pytest and hypothesis, not lmdb
# (the disk tier's index). Carry it as a wheel in .whl (ignored by git) built here with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 -d .whl lmdb
# and run:  device.run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
# What it prints also lands in $OUT (device.txt, gpu_tests.txt, bandwidth.txt/.json).
set -uo pipefail
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# kvbm.storage and kvbm.transports live in top-level folders (the package-dir mapping of
# pyproject.toml): without an install, a link farm puts them where imports look.
farm=/tmp/kvbm-farm
rm -rf "$farm" && mkdir -p "$farm/kvbm"
for f in kvbm/*; do ln -s "$PWD/$f" "$farm/kvbm/$(basename "$f")"; done
ln -s "$PWD/storage" "$farm/kvbm/storage"
ln -s "$PWD/transports" "$farm/kvbm/transports"
export PYTHONPATH="$farm${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=${OUT:-/tmp/kvbm-gpu-out}
mkdir -p "$out"
(nvidia-smi -L || echo "no nvidia-smi") 2>&1 | tee "$out/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    2>&1 | tee -a "$out/device.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider -rs \
    tests/test_pool.py tests/test_shm_pool.py tests/test_mover_tp.py tests/test_local_copy.py \
    $(ls tests/test_transport_nvlink.py 2>/dev/null) 2>&1 | tee "$out/gpu_tests.txt"
[ "${SKIP_BENCH:-0}" = 1 ] && exit 0
python3 bench/offload_bandwidth.py --skip-object --no-progress --repeat 3 \
    --dir /tmp/kvbm-bw 2>&1 | tee "$out/bandwidth.txt"
python3 bench/offload_bandwidth.py --skip-object --no-progress --repeat 3 --json \
    --dir /tmp/kvbm-bw2 > "$out/bandwidth.json" 2> "$out/bandwidth.err"
