#!/usr/bin/env bash
# One command from a fresh checkout to a served model:
#   1. sets up .venv with scripts/setup.sh (torch 2.14.1, then this package; again after pyproject.toml changes),
#   2. starts the REST service on 127.0.0.1:8000 in the background (log: logs/server.log),
#   3. trains a small model on data/sample through POST /jobs, printing its progress,
#   4. prints the calls to make next (curl) and runs one /verify,
#   5. keeps the server in the foreground until Ctrl-C.
#
# Environment overrides: FACEID_HOST (127.0.0.1), FACEID_PORT (8000), PYTHON (python3),
# FACEID_VENV (.venv), FACEID_DEMO_EPOCHS (5), FACEID_DEMO_TRAIN=0 (start the server only), and
# every FACEID_* service setting (docs/SERVICE.md), for example FACEID_API_KEY.
set -euo pipefail

cd "$(dirname "$0")/.."
HOST="${FACEID_HOST:-127.0.0.1}"
PORT="${FACEID_PORT:-8000}"
PYTHON="${PYTHON:-python3}"
VENV="${FACEID_VENV:-.venv}"
EPOCHS="${FACEID_DEMO_EPOCHS:-5}"
export FACEID_PORT="$PORT"  # the server refuses FACEID_INFER_PORT equal to it
export FACEID_DATA_DIR="${FACEID_DATA_DIR:-$PWD/data}"
export FACEID_MODELS_DIR="${FACEID_MODELS_DIR:-$PWD/models}"
URL="http://$HOST:$PORT"

[ -x "$VENV/bin/python" ] || echo "== creating $VENV (first run only; torch is a large download)"
VENV="$VENV" PYTHON="$PYTHON" bash scripts/setup.sh
PY="$VENV/bin/python"

# Another server already on the port would answer the checks below in this one's place.
if ! "$PY" -c 'import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], int(sys.argv[2])))' "$HOST" "$PORT" 2>/dev/null; then
    echo "error: $HOST:$PORT is taken (another server?); stop it, or run with FACEID_PORT=<a free port>" >&2
    exit 1
fi

mkdir -p logs
echo "== starting the server on $URL (data: $FACEID_DATA_DIR, models: $FACEID_MODELS_DIR)"
"$PY" -m uvicorn --factory app.main:create_app --host "$HOST" --port "$PORT" >>logs/server.log 2>&1 &
SERVER=$!
stop_server() { kill -TERM "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; }
trap 'echo; echo "== stopping the server"; stop_server; exit 0' INT TERM

# Everything else speaks HTTP through httpx (installed with the package), so no curl or jq is needed.
export FACEID_URL="$URL" FACEID_DEMO_EPOCHS="$EPOCHS" FACEID_SERVER_PID="$SERVER"
if ! "$PY" - <<'EOF'
import os, sys, time
from pathlib import Path

import httpx

url = os.environ["FACEID_URL"]
key = os.environ.get("FACEID_API_KEY") or None
headers = {"X-API-Key": key} if key else {}
client = httpx.Client(base_url=url, headers=headers, timeout=60)
pid = int(os.environ["FACEID_SERVER_PID"])

deadline = time.monotonic() + 120
while True:
    try:
        if client.get("/health").status_code == 200:
            break
    except httpx.TransportError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("error: the server exited at start; see logs/server.log:\n"
                 + "\n".join(Path("logs/server.log").read_text().splitlines()[-15:]))
    if time.monotonic() > deadline:
        sys.exit("error: the server did not answer /health within 120 s; see logs/server.log")
    time.sleep(0.5)
print(f"   server is up: the web page at {url}/ , the API reference at {url}/docs")
if int(os.environ.get("FACEID_INFER_REPLICAS") or 0):
    infer = f"http://{os.environ.get('FACEID_INFER_HOST') or '127.0.0.1'}:{os.environ.get('FACEID_INFER_PORT')}"
    print(f"   {os.environ['FACEID_INFER_REPLICAS']} inference replicas answer {infer}/embed and {infer}/verify "
          "once a model is served")

if os.environ.get("FACEID_DEMO_TRAIN", "1") == "0":
    sys.exit(0)
job = {"preset": "cpu-small", "train": "sample/train", "val": "sample/val",
       "pairs_file": "sample/pairs.txt", "epochs": int(os.environ["FACEID_DEMO_EPOCHS"]),
       "eval_pairs": 2000}
r = client.post("/jobs", json=job)
if r.status_code != 202:
    sys.exit(f"error: POST /jobs answered {r.status_code}: {r.json().get('detail')}")
job_id = r.json()["id"]
print(f"== training job {job_id} on data/sample (GET {url}/jobs/{job_id})")
last = None
while True:
    j = client.get(f"/jobs/{job_id}").json()
    p = j.get("progress") or {}
    line = (f"   {j['status']:<9} epoch {p.get('epoch') or 0}/{p.get('epochs') or job['epochs']} "
            f"{p.get('percent') or 0:5.1f}%")
    if p.get("images_per_s"):
        line += f"  {p['images_per_s']:.0f} img/s  ETA {int(p.get('eta_s') or 0)} s"
    if j["metrics"]:
        m = j["metrics"][-1]
        line += f"  | epoch {m['epoch']}: acc {m.get('acc', 0):.3f} auc {m.get('auc', 0):.3f}"
    if line != last:
        print(line, flush=True)
        last = line
    if j["status"] not in ("queued", "running"):
        break
    time.sleep(2)
if j["status"] != "succeeded":
    tail = client.get(f"/jobs/{job_id}/logs", params={"tail": 15}).json()["lines"]
    sys.exit(f"error: the job {j['status']}: {j.get('error')}\n" + "\n".join(tail))
best = j["best"] or {}
print(f"== job succeeded: best epoch {best.get('epoch')} ({best.get('metric')} {best.get('value') or 0:.3f}),"
      f" thresholds {j['thresholds']}")

val = Path(os.environ["FACEID_DATA_DIR"]) / "sample" / "val"
people = sorted(d for d in val.iterdir() if d.is_dir())
a1, a2 = sorted(people[0].glob("*.jpg"))[:2]
b1 = sorted(people[1].glob("*.jpg"))[0]
h = f' -H "X-API-Key: $FACEID_API_KEY"' if key else ""
print(f"""
== try it (docs/SERVICE.md has every route, in curl and httpx):
curl{h} {url}/model
curl{h} -F image1=@{a1} -F image2=@{a2} {url}/verify     # same person
curl{h} -F image1=@{a1} -F image2=@{b1} {url}/verify     # different people
curl{h} -F image=@{a1} {url}/embed
curl{h} -F image1=@{a1} -F image2=@{a2} -F threshold=far_1e-3 {url}/verify
""")
for x, y, what in ((a1, a2, "same person"), (a1, b1, "different people")):
    with open(x, "rb") as f1, open(y, "rb") as f2:
        res = client.post("/verify", files={"image1": f1, "image2": f2}).json()
    print(f"   /verify {what}: similarity {res['similarity']:.3f}, threshold {res['threshold']:.3f} -> "
          f"match {res['match']}")
EOF
then
    stop_server
    exit 1
fi

echo
echo "== the server keeps running at $URL (the web page: $URL/ ; Ctrl-C stops it; log: logs/server.log)"
wait "$SERVER"
