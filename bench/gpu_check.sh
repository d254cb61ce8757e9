#!/usr/bin/env bash
# The GPU check in one prepared run: bench/train_throughput.py and bench/serve_throughput.py
# with --device cuda, their tables written to $OUT (default /tmp/faceid-gpu):
#
#   bash bench/gpu_check.sh prepare   # on a machine with network to the package index: fills .gpu/
#   bash bench/gpu_check.sh run       # on the GPU host, after copying the tree (with .gpu/) there
#   bash bench/gpu_check.sh graphs    # the CUDA graph test and FACEID_COMPILE=off,cudagraph served
#   bash bench/gpu_check.sh replicas  # the CUDA graph test, then replicas sharing the GPU
#   bash bench/gpu_check.sh job       # gpu-preset jobs through POST /jobs: where their time goes
#
# `prepare` puts into .gpu/ (ignored by git, about 30 MB): wheels for Python 3.12 of the packages
# a GPU host with only torch installed lacks (FastAPI, pydantic, uvicorn and their own needs, at
# the versions this checkout's .venv has), and 4,000 LFW images (from FACEID_LFW_DIR, or LFW) of
# people with two or more pictures, enough for steady GPU batches (data/sample has 300 training
# images). `run` installs the wheels into
# /tmp/site, records nvidia-smi, runs both benchmarks, then checks the product on the GPU host
# (CLI train/evaluate/verify, the refusal of more processes than GPUs, the gloo DDP tests and
# scripts/run.sh); about 8 minutes at most.
# Knobs: GPU_BATCH (128), GPU_IMG (112), GPU_STEPS (15), GPU_WORKERS (8), GPU_SECONDS (5, per serving row),
# GPU_TRAIN_ROWS, GPU_TRAIN_LIMIT (240 s) / GPU_SERVE_LIMIT (140 s), LFW (the
# LFW folder for prepare), GPU_DEVICE (cuda; cpu runs the same script here as a dry run:
# PATH=.venv/bin:$PATH GPU_DEVICE=cpu GPU_BATCH=16 GPU_IMG=32 GPU_STEPS=2 GPU_WORKERS=2 GPU_SECONDS=2 bash bench/gpu_check.sh run).
set -uo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=.gpu
WHEELS=(fastapi starlette pydantic pydantic_core annotated-types typing-inspection annotated-doc opentelemetry-api typing_extensions
        uvicorn httptools python-multipart anyio h11 facenet-pytorch httpx httpcore certifi idna)

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
    local lfw=${LFW:-${FACEID_LFW_DIR:-}}
    [ -n "$lfw" ] && [ -d "$lfw" ] || { echo "error: no LFW folder at '$lfw'; set FACEID_LFW_DIR (or LFW) to it" >&2; exit 2; }
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
    # For `align`: every person with 2+ images, and everyone named in pairs.txt fold 1, with pairs.txt
    rm -rf "$GPU_DIR/lfwa" && mkdir -p "$GPU_DIR/lfwa"
    "$venv_py" - "$lfw" "$GPU_DIR/lfwa" <<'PY'
import shutil, sys
from pathlib import Path
sys.path.insert(0, ".")
from faceid.pairs import identities_in, load_pairs
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
fold1 = identities_in(load_pairs(src / "pairs.txt", folds=[1]))
n = 0
for person in sorted(p for p in src.iterdir() if p.is_dir()):
    images = sorted(person.glob("*.jpg"))
    if len(images) >= 2 or person.name in fold1:
        shutil.copytree(person, dst / person.name)
        n += len(images)
shutil.copyfile(src / "pairs.txt", dst / "pairs.txt")
print(f"{n} images in {dst}")
PY
    du -sh "$GPU_DIR"
    echo "now: copy this tree, $GPU_DIR/ included, to the GPU host and run: bash bench/gpu_check.sh run"
}

setup() {
    out=${OUT:-/tmp/faceid-gpu}
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1
    device=${GPU_DEVICE:-cuda}
    if [ "$device" = cuda ] && [ -d "$GPU_DIR/whl" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$GPU_DIR"/whl/*.whl || { echo "error: installing the wheels in $GPU_DIR/whl failed" >&2; exit 1; }
        export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD
    fi
}

# CUDA graph serving (FACEID_COMPILE=cudagraph) against eager: its GPU test, then both modes through
# serve_throughput (offline and server, 1 and 16 clients, short rows); about 4 minutes.
graphs() {
    setup
    timeout 70 python3 -m pytest -q -p no:cacheprovider tests/test_inference.py -k cuda_graph 2>&1 \
        | tail -n 15 | tee "$out/graphs_test.txt"
    timeout "${GPU_SERVE_LIMIT:-190}" python3 bench/serve_throughput.py --device "$device" --img_size "${GPU_IMG:-112}" \
        --compile off,cudagraph --clients 1,16 --seconds 3 --warmup 1 --rounds 0 --pairs 2 --pair_seconds 2 \
        --pair_processes 1 2>&1 | tee "$out/graphs_serve.txt"
}

# Inference replicas (FACEID_INFER_REPLICAS) sharing the GPU: the CUDA graph test first, then the
# main port against 4 replicas with 1, 16 and 64 clients (one server process cannot keep a GPU busy:
# bench/README.md, serve_throughput); about 4 minutes.
replicas() {
    setup
    timeout 70 python3 -m pytest -q -p no:cacheprovider tests/test_inference.py -k cuda_graph 2>&1 \
        | tail -n 15 | tee "$out/graphs_test.txt"
    timeout "${GPU_SERVE_LIMIT:-200}" python3 bench/serve_throughput.py --device "$device" --img_size "${GPU_IMG:-112}" \
        --replicas "${GPU_REPLICAS:-4},0" --clients 1,16,64 --seconds 3 --warmup 1 --rounds 0 --pairs 2 \
        --pair_seconds 2 --pair_processes 1 2>&1 | tee "$out/replicas_serve.txt"
}

# Aligned against unaligned faces (bench/align_compare.py) with the preset and three aligned variants,
# on the GPU; about 5 minutes.
align() {
    setup
    python3 -c 'import torch, skimage, facenet_pytorch; print("torch", torch.__version__, "skimage", skimage.__version__)' \
        2>&1 | tee "$out/align_env.txt"
    timeout "${GPU_ALIGN_LIMIT:-420}" python3 bench/align_compare.py --lfw "${GPU_LFW:-$GPU_DIR/lfwa}" --device "$device" \
        --workers "${GPU_WORKERS:-12}" --recipes "${GPU_RECIPES:-none,arcface,arcface_light,arcface_64}" \
        --work /tmp/faceid-align --json "$out/align.json" ${GPU_ALIGN_ARGS:-} 2>&1 | tee "$out/align.txt" \
        | grep -v " INFO faceid\\." 
}

# The gpu preset as a job through POST /jobs, and the same job evaluating after every epoch (the
# cadence before eval_every_min and save_every_min), each with its time split (bench/job_time.py);
# GPU_JOB_MIN minutes per job (2), about 7 minutes in all with finding the faces.
job() {
    setup
    timeout "${GPU_JOB_LIMIT:-480}" python3 bench/job_time.py --lfw "${GPU_LFW:-$GPU_DIR/lfwa}" --preset gpu \
        --device "$device" --time_limit_min "${GPU_JOB_MIN:-2}" --json "$out/job.json" ${GPU_JOB_ARGS:-} 2>&1 \
        | tee "$out/job.txt" | grep -v " INFO "
}

run() {
    setup
    { nvidia-smi || true; nproc; python3 -c 'import torch, fastapi, pydantic; print("torch", torch.__version__, "cuda",
torch.cuda.is_available(), "fastapi", fastapi.__version__, "pydantic", pydantic.VERSION)'; } 2>&1 | tee "$out/env.txt"
    local data=$GPU_DIR/lfw
    [ -d "$data" ] || data=data/sample/train
    # 1. The benchmarks (bench/README.md, the GPU tables).
    timeout "${GPU_TRAIN_LIMIT:-240}" python3 bench/train_throughput.py --device "$device" --data "$data" \
        --img_size "${GPU_IMG:-112}" --batch_size "${GPU_BATCH:-128}" --warmup 3 --steps "${GPU_STEPS:-15}" \
        --workers "${GPU_WORKERS:-8}" --rows "${GPU_TRAIN_ROWS:-matmul,data,plain,faceid,off,bf16,compile,ddp}" \
        --json "$out/train.json" 2>&1 \
        | tee "$out/train.txt"
    timeout "${GPU_SERVE_LIMIT:-140}" python3 bench/serve_throughput.py --device "$device" --img_size "${GPU_IMG:-112}" \
        --seconds "${GPU_SECONDS:-5}" --warmup 2 --rounds 0 --pairs 3 --pair_seconds "${GPU_PAIR_SECONDS:-2}" \
        --pair_processes 1 2>&1 | tee "$out/serve.txt"
    # 2. The product on a GPU host, everything into one log: training, evaluate and verify on the GPU from
    # the CLI; more processes than GPUs refused with the fix named; the gloo DDP tests (CPU processes on a
    # GPU host); the main command, scripts/run.sh (server, POST /jobs, /verify), with the GPU's python.
    local smoke=/tmp/faceid-smoke
    # scripts/run.sh wants a venv: a stand-in whose python runs this python3 (a link would lose its venv).
    rm -rf "$smoke" && mkdir -p "$smoke/venv/bin"
    printf '#!/bin/sh\nexec %s "$@"\n' "$(python3 -c 'import sys; print(sys.executable)')" > "$smoke/venv/bin/python"
    chmod +x "$smoke/venv/bin/python"
    {
        echo "== CLI train on $device"
        timeout 60 python3 -m faceid.cli train --preset cpu-small --train data/sample/train --val data/sample/val \
            --pairs_file data/sample/pairs.txt --epochs 2 --device "$device" --ckpt_dir "$smoke/ckpt" \
            --events_file "$smoke/events.jsonl" --quiet; echo "rc $?"
        grep -h '"event": "start"' "$smoke/events.jsonl" | head -c 600; echo
        tail -n 2 "$smoke/ckpt/metrics.jsonl"; ls "$smoke/ckpt"
        echo "== CLI evaluate and verify on $device"
        timeout 30 python3 -m faceid.cli evaluate "$smoke/ckpt/backbone_best.pt" --val data/sample/val \
            --pairs_file data/sample/pairs.txt --device "$device"; echo "rc $?"
        local a=(data/sample/val/*/) ; local p1 p2 q1
        p1=$(ls "${a[0]}"*.jpg | head -1); p2=$(ls "${a[0]}"*.jpg | sed -n 2p); q1=$(ls "${a[1]}"*.jpg | head -1)
        timeout 30 python3 -m faceid.cli verify "$p1" "$p2" --checkpoint "$smoke/ckpt/backbone_best.pt" \
            --device "$device" --json; echo "rc $?"
        timeout 30 python3 -m faceid.cli verify "$p1" "$q1" --checkpoint "$smoke/ckpt/backbone_best.pt" \
            --device "$device" --json; echo "rc $?"
        if [ "$device" = cuda ]; then
            echo "== one process more than GPUs (expect rc 2 and the fix named)"
            local many
            many=$(python3 -c 'import torch; print(torch.cuda.device_count() + 1)')
            timeout 30 python3 -m faceid.cli train --train data/sample/train --val data/sample/val --device cuda \
                --nproc_per_node "$many" --ckpt_dir "$smoke/many"; echo "rc $?"
        fi
        echo "== gloo DDP tests on this host"
        timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_runtime_dist.py tests/test_distributed.py \
            2>&1 | tail -n 15
        echo "== scripts/run.sh with 2 epochs"
        FACEID_VENV=$smoke/venv FACEID_PORT=8129 FACEID_MODELS_DIR=$smoke/models FACEID_DEMO_EPOCHS=2 \
            timeout -s INT 80 ./scripts/run.sh; echo "rc $?"
        tail -n 20 logs/server.log 2>/dev/null | grep -i -E "error|traceback|device|cuda" | head
    } 2>&1 | tee "$out/smoke.txt"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    graphs) graphs ;;
    replicas) replicas ;;
    align) align ;;
    job) job ;;
    *) echo "usage: bash bench/gpu_check.sh prepare|run|graphs|replicas|align|job" >&2; exit 2 ;;
esac
