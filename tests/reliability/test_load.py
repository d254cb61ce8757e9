"""Load as a short test: bench/load_test.py's measurement against a real uvicorn
server with a real (tiny, 32 px) model, 8 clients for a few seconds. Every /verify answer is
right (same similarity as when sent alone), none fails, /health keeps answering while inference
runs, and the server's memory does not grow. The full run with the figures is
`bench/load_test.py` (bench/README.md); the bounds here are loose because the machine is shared.
"""

from __future__ import annotations

import sys

import pytest
from reliability_helpers import REPO

sys.path.insert(0, str(REPO / "bench"))

import load_test

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_short_load_on_a_real_server(real_checkpoint, capsys):
    args = load_test.parse_args(
        ["--checkpoint", str(real_checkpoint), "--clients", "8", "--seconds", "3", "--warmup", "0.5", "--pairs", "4"]
    )
    res = load_test.run(args)
    load_test.print_table(args, res["checkpoint"], res)
    c = res["counts"]
    assert c["requests"] >= 8 and c["errors"] == 0 and c["wrong"] == 0, (c, res["error_kinds"])
    assert c.get("health_errors", 0) == 0 and len(res["health"]) >= 10
    health_p99 = load_test.percentile(res["health"], 99)
    verify_p50 = load_test.percentile(res["verify"], 50)
    assert health_p99 < max(1.0, verify_p50), (health_p99, verify_p50)  # not queued behind inference
    assert res["rss_end"] - res["rss_warm"] < 50, (res["rss_warm"], res["rss_end"])
