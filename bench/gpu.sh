#!/usr/bin/env bash
# The GPU run, on a bare GPU machine with PyTorch but without our other packages and without internet:
#     BENCH_COMMIT=<commit> OUT=<dir> bash bench/gpu.sh   # results in $OUT (default bench/results/<card>)
# It installs the wheels carried in .whl/ (an ignored folder, filled beforehand on a machine with
# internet by the one command below), then runs `python -m bench.gpu`, which ends within its budget
# (330 s after it starts; --budget SECONDS to change), under a hard `timeout` of 420 s that still leaves
# the figures of every finished phase. Files in $OUT: results.json, results.md, extra.json, server.log,
# steps.jsonl (the service's per-step log, where the service writes one) and log.txt (this output).
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 --platform any -d .whl \
#       transformers==5.24.0 litserve==0.2.19 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pyzmq==27.3.0 \
#       pydantic==2.13.4 pydantic-core==2.46.4 pydantic-settings==2.14.1 typing-inspection==0.4.2 \
#       annotated-types==0.8.0 python-dotenv==1.2.2 opentelemetry-api==1.45.2
#
# (17 MB; everything else the service needs is already in that machine's image.)
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
OUT="${OUT:-}"
out_args=()
log=/dev/null
if [ -n "$OUT" ]; then
    mkdir -p "$OUT"
    out_args=(--out "$OUT")
    log="$OUT/log.txt"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } 2>&1 | tee "$log"
timeout -k 15 420 python3 -m bench.gpu ${out_args[@]+"${out_args[@]}"} "$@" 2>&1 | tee -a "$log"
