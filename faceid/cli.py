"""The `faceid` command: train, evaluate, embed, verify, prepare, serve.

`faceid train` is faceid.cli_train (also `python -m faceid.train`); evaluate, embed and verify are
faceid.cli_model. User errors print one line, `error: ...`, and exit with code 2; no traceback
(faceid.cli_common).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from faceid.cli_common import (
    EXIT_TERMINATED,
    EXIT_USER_ERROR,
    Parser,
    UserError,
    add_min_face,
    setup_logging,
    user_error,
)
from faceid.cli_model import cmd_embed, cmd_evaluate, cmd_verify
from faceid.cli_train import train_main
from faceid.config import TrainConfig
from faceid.omp import serving_defaults

__all__ = ["EXIT_TERMINATED", "EXIT_USER_ERROR", "build_parser", "main", "train_main"]


# --- prepare / serve -------------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> int:
    """Find the faces of every image in the folders now, so training runs and jobs read them from
    the cache; print what was found, and list the images without a face. With --distill, compute
    the teacher's descriptors now too (cached the same way)."""
    from faceid.data import scan_folder
    from faceid.facecache import FaceCache, find_faces
    from faceid.faces import DetectorSpec
    from faceid.runtime import resolve_device
    from faceid.teacher import TeacherCache, teacher_vectors
    from faceid.teacher_files import check_teacher

    device = resolve_device(args.device)
    check_teacher(args.distill)
    spec = DetectorSpec()
    total = {"images": 0, "with_face": 0, "no_face": 0, "unreadable": 0}
    for root in args.folders:
        folder = scan_folder(root, what="folder", min_identities=1)
        found = find_faces(folder.paths, spec, workers=args.workers, device=device, what=root)
        counts = {
            "images": len(found),
            "with_face": sum(bool(f) for f in found),
            "no_face": sum(f is not None and not f for f in found),
            "unreadable": sum(f is None for f in found),
        }
        for k in total:
            total[k] += counts[k]
        print(json.dumps({"folder": root, **counts, "several_faces": sum(f is not None and len(f) > 1 for f in found)}))
        for p, f in zip(folder.paths, found):
            if f is not None and not f:
                print(json.dumps({"no_face": str(p)}))
        if args.distill != "none":
            readable = [p for p, f in zip(folder.paths, found) if f is not None]
            teacher_vectors(readable, args.distill, spec, workers=args.workers, what=root)
    cache = FaceCache(spec)
    out: dict = {"total": total, "cache": str(cache.path)}
    cache.close()
    if args.distill != "none":
        teacher_cache = TeacherCache(args.distill, spec)
        out["teacher_cache"] = str(teacher_cache.path)
        teacher_cache.close()
    print(json.dumps(out))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    # Before torch is imported: sleeping OpenMP threads, so inference and a training job can share
    # a small CPU (bench/README.md, omp_wait).
    serving_defaults()
    # The flags are the FACEID_* settings of the same names (docs/SERVICE.md); the app reads them
    # from the environment. FACEID_PORT lets it refuse FACEID_INFER_PORT equal to this port.
    host = args.host or os.environ.get("FACEID_HOST", "").strip() or "127.0.0.1"
    port = args.port
    if port is None:
        raw = os.environ.get("FACEID_PORT", "").strip() or "8000"
        if not raw.isdigit() or not 0 < int(raw) < 65536:
            raise UserError(f"FACEID_PORT={raw!r} is not a port; set it to a number from 1 to 65535, or pass --port")
        port = int(raw)
    os.environ["FACEID_PORT"] = str(port)
    for flag, name in (
        ("infer_replicas", "FACEID_INFER_REPLICAS"),
        ("infer_port", "FACEID_INFER_PORT"),
        ("infer_host", "FACEID_INFER_HOST"),
    ):
        if getattr(args, flag) is not None:
            os.environ[name] = str(getattr(args, flag))
    import uvicorn

    from app.settings import load_settings

    # FACEID_ROLE=inference: a stateless inference server (app/replica_app.py), any number of
    # them behind a load balancer, each following the API server's model in the job database
    role = load_settings().role
    app = "app.replica_app:create_replica_app" if role == "inference" else "app.main:create_app"
    uvicorn.run(app, factory=True, host=host, port=port, log_level=args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="faceid", description="Train and serve face verification.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train a model (all flags: faceid train --help)", add_help=False)

    ckpt_default = os.path.join("models", "backbone_best.pt")
    e = sub.add_parser(
        "evaluate",
        help="score a checkpoint on a folder and/or a pairs file",
        description="Score a checkpoint on balanced pairs sampled from --val and/or on a "
        "pairs file. The pairs are sampled, and images embedded (mirror averaging too), "
        "as the training's evaluation did: for the same checkpoint and --val the numbers "
        "are those of its metrics.jsonl.",
    )
    e.add_argument(
        "checkpoint",
        nargs="?",
        default=ckpt_default,
        help=f"backbone_best.pt or last.pt written by faceid train (default: {ckpt_default})",
    )
    e.add_argument("--val", metavar="FOLDER", help="ImageFolder root; balanced pairs are sampled from it")
    e.add_argument(
        "--pairs_file",
        metavar="FILE",
        help="LFW pairs.txt-style protocol (a relative path not found as given is taken inside --val)",
    )
    e.add_argument("--pairs_root", metavar="DIR", help="image root of --pairs_file (default: its folder, then --val)")
    e.add_argument(
        "--pairs_folds", type=int, nargs="+", metavar="N", help="1-based folds of --pairs_file to use (default: all)"
    )
    e.add_argument(
        "--eval_pairs",
        type=int,
        default=None,
        metavar="N",
        help="balanced pairs sampled from --val (default: the checkpoint's eval_pairs, "
        f"else {TrainConfig.model_fields['eval_pairs'].default})",
    )
    e.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="seed of the sampled pairs (default: the checkpoint's seed, else "
        f"{TrainConfig.model_fields['seed'].default})",
    )
    e.add_argument("--workers", type=int, default=2, metavar="N", help="image-decoding worker processes (default: 2)")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    e.set_defaults(func=cmd_evaluate)

    m = sub.add_parser("embed", help="print the embedding of one or more images (JSON lines)")
    m.add_argument("images", nargs="+")
    m.add_argument("--checkpoint", default=ckpt_default)
    m.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    m.add_argument(
        "--no-detect",
        dest="detect",
        action="store_false",
        help="the images are aligned face crops already: skip face detection",
    )
    add_min_face(m)
    m.set_defaults(func=cmd_embed)

    v = sub.add_parser("verify", help="are two images the same person? (the checkpoint's threshold)")
    v.add_argument("image1")
    v.add_argument("image2")
    v.add_argument("--checkpoint", default=ckpt_default)
    v.add_argument(
        "--threshold",
        help="cosine in [-1, 1] or acc | far_1e-2 | far_1e-3, or pairs_acc for a model trained "
        "with a pairs file (default acc)",
    )
    v.add_argument("--json", action="store_true", help="print a JSON object")
    v.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    v.add_argument(
        "--no-detect",
        dest="detect",
        action="store_false",
        help="the images are aligned face crops already: skip face detection",
    )
    add_min_face(v)
    v.set_defaults(func=cmd_verify)

    r = sub.add_parser(
        "prepare",
        help="find the faces in dataset folders ahead of training (cached)",
        description="Detect the faces (five landmarks) of every image in each ImageFolder "
        "root and keep them in the face cache (FACEID_CACHE_DIR, default ~/.cache/faceid), "
        "so training runs and jobs with --align arcface start at once. Prints one JSON "
        "line per folder with its counts, and one per image where no face was found.",
    )
    r.add_argument("folders", nargs="+", metavar="FOLDER", help="ImageFolder root (one sub-folder per person)")
    r.add_argument("--workers", type=int, default=2, metavar="N", help="detection processes (default: 2)")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    r.add_argument(
        "--distill",
        default="none",
        choices=["none", "dlib"],
        help="also compute this teacher's descriptors for training with --distill (default: none)",
    )
    r.set_defaults(func=cmd_prepare)

    s = sub.add_parser("serve", help="start the REST service (settings: FACEID_* environment)")
    s.add_argument("--host", default=None, help="address to listen on (default FACEID_HOST, else 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port to listen on (default FACEID_PORT, else 8000)")
    s.add_argument("--log-level", default="info")
    s.add_argument(
        "--infer_replicas",
        type=int,
        default=None,
        metavar="N",
        help="also start N inference replicas answering /embed, /embed/batch and /verify on "
        "--infer_port (FACEID_INFER_REPLICAS; docs/SERVICE.md)",
    )
    s.add_argument("--infer_port", type=int, default=None, help="the replicas' port (FACEID_INFER_PORT)")
    s.add_argument("--infer_host", default=None, help="the replicas' address (FACEID_INFER_HOST, default 127.0.0.1)")
    s.set_defaults(func=cmd_serve)
    from faceid.cli_gallery import add_parser as add_gallery_parser  # faceid gallery ...

    add_gallery_parser(sub)
    from app.worker import add_parser as add_worker_parser  # faceid worker

    add_worker_parser(sub)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return args.func(args)
    except UserError as e:
        return user_error(str(e), None, "usage")
    except Exception as e:
        from faceid.errors import FaceIDError

        if isinstance(e, FaceIDError):
            return user_error(str(e), None, "usage")
        raise


if __name__ == "__main__":
    sys.exit(main())
