"""Gallery search at scale, and open-set identification on real faces.

1. Search (default): identify latency p50/p99 and memory with 10k, 100k and 1M enrolled faces of
   synthetic 512-d unit embeddings (4 faces a person), measured in one run, one size after the
   other (each index freed before the next). The latency is faceid.gallery_index's search alone, the
   embedding of the probe not counted: one matrix product over the gallery's float32 matrix, then
   the best face of each person and the top 5 people. Also the cost of enrolling 16 faces and
   deleting one into the full index (incremental: nothing is rebuilt).

       python bench/gallery_search.py                      # 10k, 100k, 1M
       python bench/gallery_search.py --sizes 10000 --queries 200

2. Open set (`--people FOLDER --checkpoint CKPT`): people the model was not trained on (one
   sub-folder each). Half of those with at least 3 photos are enrolled with 2 photos each, their
   other photos are probes; one photo of each other person is a probe of someone never enrolled.
   Prints rank-1 accuracy of the enrolled people's probes, the share named rightly at the
   threshold (far_1e-3 unless --threshold), and the share of never-enrolled probes answered
   unknown.

       python bench/gallery_search.py --people data/lfw/val --checkpoint models/lfw/backbone_best.pt
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from faceid.gallery import normalize_rows
from faceid.gallery_index import GalleryIndex


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(n: int, dim: int, faces_per_person: int, seed: int, n_probes: int) -> tuple[GalleryIndex, list[np.ndarray]]:
    """`n` synthetic faces, `faces_per_person` a person: each a person's centre plus noise (two
    faces of one person at cosine about 0.6, as real embeddings); the index, and `n_probes` new
    photos of enrolled people (a centre plus fresh noise). The centres are freed before the
    memory is read."""
    rng = np.random.default_rng(seed)
    people = n // faces_per_person
    centres = normalize_rows(rng.standard_normal((people, dim), dtype=np.float32))
    index = GalleryIndex(dim, capacity=n + 64)
    chunk = 50_000
    with index.loading():  # as a gallery loads: a large one's centroids drawn once, at the end
        for s in range(0, n, chunk):
            k = min(chunk, n - s)
            who = np.arange(s, s + k) // faces_per_person
            v = centres[who] + rng.standard_normal((k, dim), dtype=np.float32) * np.float32(0.8 / np.sqrt(dim))
            index.add(range(s, s + k), [f"p{p}" for p in who], normalize_rows(v))
            del v
    rng = np.random.default_rng(1)
    who = rng.integers(0, people, n_probes)
    noise = rng.standard_normal((n_probes, dim), dtype=np.float32) * np.float32(0.8 / np.sqrt(dim))
    probes = list(normalize_rows(centres[who] + noise))
    return index, probes


def _timed(search, probes: list[np.ndarray]) -> tuple[np.ndarray, list]:
    times, found = [], []
    for i, q in enumerate(probes):
        t = time.perf_counter()
        out = search(q[None], 5)[0]
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - t)
            found.append(out)
    return np.array(times) * 1e3, found


def bench_search(args: argparse.Namespace) -> None:
    rows = []
    base = rss_mb()
    for n in args.sizes:
        t = time.perf_counter()
        index, probes = build(n, args.dim, 4, seed=n, n_probes=args.queries + 3)
        build_s = time.perf_counter() - t
        rng = np.random.default_rng(2)
        ms, found = _timed(index.search, probes)
        coarse = index.snapshot.coarse is not None
        recall = exact_p50 = None
        if coarse:  # the exact scan beside it: its latency, and whether both name the same person
            exact_ms, exact = _timed(index.exact_search, probes)
            exact_p50 = round(float(np.percentile(exact_ms, 50)), 2)
            recall = round(float(np.mean([a[0].person == b[0].person for a, b in zip(found, exact)])), 4)
        add_vecs = normalize_rows(rng.standard_normal((16, args.dim), dtype=np.float32))
        t = time.perf_counter()
        index.add(range(n + 100, n + 116), ["newcomer"] * 16, add_vecs)
        add_ms = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        index.remove([n + 100])
        del_ms = (time.perf_counter() - t) * 1e3
        row = {
            "faces": n,
            "people": n // 4,
            "queries": len(ms),
            "search": "nearest lists" if coarse else "exact",
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "exact_p50_ms": exact_p50,
            "top1_same_as_exact": recall,
            "index_mb": round(index.nbytes / 2**20, 1),
            "rss_mb": round(rss_mb(), 1),
            "rss_over_start_mb": round(rss_mb() - base, 1),
            "enroll16_ms": round(add_ms, 2),
            "delete1_ms": round(del_ms, 2),
            "build_s": round(build_s, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del index, probes, found
        gc.collect()
    print(f"\npeak RSS of the run: {rss_mb('VmHWM'):.0f} MB (process start: {base:.0f} MB)\n")
    print(
        "| enrolled faces | people | search | p50 | p99 | exact scan p50 | top-1 as the exact scan "
        "| index memory | process RSS | enroll 16 | delete 1 | build |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ex = f"{r['exact_p50_ms']:.1f} ms" if r["exact_p50_ms"] is not None else "-"
        rc = f"{r['top1_same_as_exact']:.3f}" if r["top1_same_as_exact"] is not None else "-"
        print(
            f"| {r['faces']:,} | {r['people']:,} | {r['search']} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | "
            f"{ex} | {rc} | {r['index_mb']:,.0f} MB | {r['rss_mb']:,.0f} MB | {r['enroll16_ms']:.2f} ms | "
            f"{r['delete1_ms']:.2f} ms | {r['build_s']:.0f} s |"
        )


def bench_open_set(args: argparse.Namespace) -> None:
    from faceid.errors import ImageError
    from faceid.gallery import prepare_faces
    from faceid.inference import Verifier

    v = Verifier.from_checkpoint(args.checkpoint, device=args.device)
    th, th_name = v.resolve_threshold(args.threshold)
    people = sorted(d for d in Path(args.people).iterdir() if d.is_dir())
    photos = {d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")) for d in people}
    rich = [n for n in photos if len(photos[n]) >= 3]
    enrolled = set(rich[::2][: args.max_people])
    strangers = [n for n in photos if n not in enrolled][: args.max_people]

    def embed(paths):
        out = []
        for p in paths:
            try:
                f = prepare_faces(v, v.read(str(p)))[0]
            except ImageError:
                continue
            out.append(f.prepared)
        return normalize_rows(v.embed(out)) if out else np.zeros((0, v.embedding_size), np.float32)

    index = GalleryIndex(v.embedding_size)
    fid = 0
    for n in sorted(enrolled):
        e = embed(photos[n][:2])
        index.add(range(fid, fid + len(e)), [n] * len(e), e)
        fid += len(e)
    known = right = rank1 = unknown = rejected = 0
    for n in sorted(enrolled):
        for q in embed(photos[n][2 : 2 + args.probes_per_person]):
            best = index.search(q[None], 1)[0][0]
            known += 1
            rank1 += best.person == n
            right += best.person == n and best.score >= th
    for n in strangers:
        for q in embed(photos[n][:1]):
            best = index.search(q[None], 1)[0][0]
            unknown += 1
            rejected += best.score < th
    print(
        json.dumps(
            {
                "checkpoint": args.checkpoint,
                "threshold": th,
                "threshold_name": th_name,
                "enrolled_people": len(enrolled),
                "enrolled_faces": fid,
                "known_probes": known,
                "rank1_accuracy": round(rank1 / max(known, 1), 4),
                "identified_at_threshold": round(right / max(known, 1), 4),
                "unknown_probes": unknown,
                "unknown_rejected": round(rejected / max(unknown, 1), 4),
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--people", help="open-set mode: a folder of people the model was not trained on")
    p.add_argument("--checkpoint")
    p.add_argument("--threshold", default="far_1e-3")
    p.add_argument("--max_people", type=int, default=500)
    p.add_argument("--probes_per_person", type=int, default=2)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    if args.people:
        if not args.checkpoint:
            p.error("--people needs --checkpoint")
        bench_open_set(args)
    else:
        bench_search(args)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
