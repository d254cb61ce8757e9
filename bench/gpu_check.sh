#!/usr/bin/env bash
# Issue 6's GPU check in one prepared run: bench/train_throughput.py and bench/serve_throughput.py
# with --device cuda, their tables written to $OUT. Two steps:
#
#   bash bench/gpu_check.sh prepare   # here, with network to the package index: fills .gpu/
#   bash bench/gpu_check.sh run       # on the GPU machine, with .gpu/ carried beside the code
#
# `prepare` puts into .gpu/ (ignored by git, about 30 MB): wheels for Python 3.12 of the packages
# the team's GPU image lacks (FastAPI, pydantic, uvicorn and their own needs, at the versions this
# checkout's .venv has), and 4,000 LFW images of people with two or more pictures, enough for
# steady GPU batches (data/sample has 300 training images). `run` installs the wheels into
# /tmp/site, records nvidia-smi, and runs both benchmarks in about 5 minutes on an H200.
# Knobs: GPU_BATCH (128), GPU_IMG (112), GPU_STEPS (20), GPU_WORKERS (8), GPU_SECONDS (8, per serving row), LFW (the
# LFW folder for prepare), GPU_DEVICE (cuda; cpu runs the same script here as a dry run:
# PATH=.venv/bin:$PATH GPU_DEVICE=cpu GPU_BATCH=16 GPU_IMG=32 GPU_STEPS=2 GPU_WORKERS=2 GPU_SECONDS=2 bash bench/gpu_check.sh run).
set -uo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=.gpu
WHEELS=(fastapi starlette pydantic pydantic_core annotated-types typing-inspection annotated-doc opentelemetry-api typing_extensions
        uvicorn httptools python-multipart anyio h11)

prepare() {
    local venv_py=.venv/bin/python
    [ -x "$venv_py" ] || { echo "error: no .venv here; run scripts/setup.sh first" >&2; exit 2; }
    grep -qx "/$GPU_DIR/" .git/info/exclude 2>/dev/null || echo "/$GPU_DIR/" >> .git/info/exclude
    rm -rf "$GPU_DIR/whl" && mkdir -p "$GPU_DIR/whl"
    local specs=() name version
    for name in "${WHEELS[@]}"; do
        version=$("$venv_py" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
        [ -n "$version" ] || { echo "error: $name is not installed in .venv" >&2; exit 2; }
        specs+=("$name==$version")
    done
    "$venv_py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$GPU_DIR/whl" "${specs[@]}" || { echo "error: pip download failed" >&2; exit 1; }
    local lfw=${LFW:-${FACEID_LFW_DIR:-../shared/data/lfw}}
    [ -d "$lfw" ] || { echo "error: no LFW folder at $lfw; set LFW=path" >&2; exit 2; }
    rm -rf "$GPU_DIR/lfw"
    "$venv_py" - "$lfw" "$GPU_DIR/lfw" <<'PY'
import shutil, sys
from pathlib import Path
src, dst, n = Path(sys.argv[1]), Path(sys.argv[2]), 0
for person in sorted(p for p in src.iterdir() if p.is_dir()):
    images = sorted(person.glob("*.jpg"))
    if len(images) < 2:
        continue
    (dst / person.name).mkdir(parents=True)
    for image in images:
        shutil.copyfile(image, dst / person.name / image.name)
        n += 1
    if n >= 4000:
        break
print(f"{n} images of {len(list(dst.iterdir()))} people in {dst}")
PY
    du -sh "$GPU_DIR"
    echo "now: run(command=\"bash bench/gpu_check.sh run\", carry=[\"$GPU_DIR\"], timeout_s=540)"
}

run() {
    local out=${OUT:-/tmp/faceid-gpu}
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1
    local device=${GPU_DEVICE:-cuda}
    if [ "$device" = cuda ] && [ -d "$GPU_DIR/whl" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$GPU_DIR"/whl/*.whl || { echo "error: installing the carried wheels failed" >&2; exit 1; }
        export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD
    fi
    { nvidia-smi || true; python3 -c 'import torch, fastapi, pydantic; print("torch", torch.__version__, "cuda",
torch.cuda.is_available(), "fastapi", fastapi.__version__, "pydantic", pydantic.VERSION)'; } 2>&1 | tee "$out/env.txt"
    local data=$GPU_DIR/lfw
    [ -d "$data" ] || data=data/sample/train
    timeout 300 python3 bench/train_throughput.py --device "$device" --data "$data" --img_size "${GPU_IMG:-112}" \
        --batch_size "${GPU_BATCH:-128}" --warmup 3 --steps "${GPU_STEPS:-20}" --workers "${GPU_WORKERS:-8}" \
        --rows matmul,data,plain,faceid,off,bf16,ddp --json "$out/train.json" 2>&1 | tee "$out/train.txt"
    timeout 240 python3 bench/serve_throughput.py --device "$device" --seconds "${GPU_SECONDS:-8}" --rounds 0 \
        --pairs 4 --pair_seconds "${GPU_PAIR_SECONDS:-3}" --pair_processes 1 2>&1 \
        | tee "$out/serve.txt"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash bench/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
