"""The `faceid` command: train, evaluate, embed, verify, prepare, serve.

`faceid train` is faceid.cli_train (also `python -m faceid.train`). User errors print one line,
`error: ...`, and exit with code 2; no traceback (faceid.cli_common).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Optional

from pydantic import ValidationError

from faceid.cli_common import (EXIT_TERMINATED, EXIT_USER_ERROR, Parser, UserError, setup_logging, user_error,
                               validation_message)
from faceid.cli_train import train_main
from faceid.config import TrainConfig
from faceid.omp import serving_defaults

log = logging.getLogger("faceid")

__all__ = ["EXIT_TERMINATED", "EXIT_USER_ERROR", "build_parser", "main", "train_main"]


# --- evaluate / embed / verify / prepare / serve -----------------------------------------------


def _load_verifier(path: str, device: str):
    from faceid.inference import Verifier

    return Verifier.from_checkpoint(path, device=device)


# Flags of `faceid evaluate` that default to the checkpoint's training config, so that its numbers
# are those of the training log for the same checkpoint and --val.
EVAL_FROM_CHECKPOINT = ("eval_pairs", "seed")


def _check_evaluate_flags(args: argparse.Namespace) -> None:
    """The bounds of the TrainConfig fields of the same names, with the same messages."""
    given = {k: getattr(args, k) for k in (*EVAL_FROM_CHECKPOINT, "workers") if getattr(args, k) is not None}
    try:
        TrainConfig(**given)
    except ValidationError as e:
        raise UserError(validation_message(e)) from None
    if args.pairs_folds and not args.pairs_file:
        raise UserError("--pairs_folds selects folds of --pairs_file, which is not given; add --pairs_file "
                        "FILE or leave out --pairs_folds")


def _checkpoint_setting(config: dict[str, Any], name: str) -> Any:
    """The checkpoint config's `name` if TrainConfig accepts it, else the TrainConfig default."""
    if name in config:
        try:
            return getattr(TrainConfig(**{name: config[name]}), name)
        except ValidationError:
            log.warning("checkpoint config has an invalid %s (%r); using the default", name, config[name])
    return TrainConfig.model_fields[name].default


def _eval_amp(config: dict[str, Any], device: str) -> str:
    """The mixed precision the training evaluated with, where this device has it: a run trained
    with --amp off evaluates in fp32 here too, not in bf16 that auto picks on some CPUs."""
    amp = config.get("amp", "auto")
    if amp not in ("auto", "off", "bf16", "fp16"):
        return "auto"
    if amp == "fp16" and device == "cpu":
        return "auto"
    if amp == "fp16" and device == "auto":
        import torch

        return amp if torch.cuda.is_available() else "auto"
    return amp


def cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from faceid.checkpoint import load_checkpoint
    from faceid.data import load_images, scan_folder
    from faceid.errors import DataError
    from faceid.evaluate import EvalPairs, cosine_scores, protocol_folder, score_protocol, score_sampled
    from faceid.inference import Verifier

    _check_evaluate_flags(args)
    if not args.val and not args.pairs_file:
        raise UserError("give --val FOLDER and/or --pairs_file FILE to evaluate on")
    ck = load_checkpoint(args.checkpoint)
    config = ck["config"] if isinstance(ck.get("config"), dict) else {}
    v = Verifier(ck, args.checkpoint, device=args.device, amp=_eval_amp(config, args.device))
    del ck
    out: dict[str, Any] = {"checkpoint": args.checkpoint, "epoch": v.epoch}
    if args.val:
        for name in EVAL_FROM_CHECKPOINT:
            if getattr(args, name) is None:
                setattr(args, name, _checkpoint_setting(config, name))
        folder = scan_folder(args.val, what="--val", min_identities=2, min_per_identity=2)
        folder, store = load_images(folder, v.img_size, workers=args.workers, crop=v.crop, what="--val",
                                    min_identities=2, min_per_identity=2, **_faces_of(v))
        if folder.no_face:
            out["val_no_face"] = len(folder.no_face)
        emb = _embed_store(v, store, config)
        out.update(eval_pairs=args.eval_pairs, seed=args.seed)
        out.update(score_sampled(emb, EvalPairs.sample(folder, args.eval_pairs, args.seed)))
    if args.pairs_file:
        from faceid.pairs import load_protocol

        try:  # found, and its images, as faceid train finds them (faceid.pairs.load_protocol)
            proto = load_protocol(args.pairs_file, args.val, root=args.pairs_root or None, folds=args.pairs_folds)
        except DataError as e:
            if args.pairs_root or not args.val:
                msg = str(e)
                if "point root at the folder" in msg:  # missing images: the root is --pairs_root here
                    msg = (msg.replace("point root at the folder", "give --pairs_root DIR, the folder")
                           + ("" if args.pairs_root else " (or --val DIR)"))
                raise DataError(msg) from None
            raise
        paths = proto.unique_paths()
        folder, store = load_images(protocol_folder(paths), v.img_size, workers=args.workers,
                                    crop=v.crop, what="--pairs_file images", min_identities=1, no_face="center",
                                    **_faces_of(v))
        if folder.no_face:
            out["pairs_no_face"] = len(folder.no_face)
        if len(folder) != len(paths):
            raise UserError(f"{len(paths) - len(folder)} image(s) of {args.pairs_file} cannot be read")
        emb = _embed_store(v, store, config)
        ia, ib = proto.index_pairs({p: i for i, p in enumerate(paths)})
        out.update(score_protocol(emb, ia, ib, proto.labels, proto.folds))
        th = v.thresholds.get("acc")
        if th is not None:
            s = cosine_scores(emb, ia, ib)
            out["pairs_acc_at_checkpoint_th"] = float(np.mean((s >= th) == (proto.labels == 1)))
    print(json.dumps(out, indent=2))
    return 0


def _faces_of(v) -> dict[str, Any]:
    """load_images' arguments that prepare images as the checkpoint's training did."""
    prep = v.preparation
    return {"align": prep.align, "detector": prep.detector, "device": v.device}


def _embed_store(v, store, config: Optional[dict[str, Any]] = None):
    """Embeddings of every image of `store`, computed as training's evaluation computes them (the
    same function and batch size, up to 512), so that the scores match the training log."""
    from faceid.evaluate import embed_store

    # training evaluates in batches of max(batch_size, 64); a GPU run's 4096 would not fit a laptop
    batch_size = min(max(int(_checkpoint_setting(config or {}, "batch_size")), 64), 512)
    return embed_store(v.model, store, v.transform, batch_size=batch_size, amp_dtype=v.amp_dtype, flip=v.flip)


def _prepared(v, path: str, detect: bool):
    """The image at `path` as the checkpoint's model takes it, with the face it was made from."""
    from faceid.faces import NoFaceError

    try:
        return v.prepare_face(v.open(path), detect)
    except NoFaceError as e:
        raise NoFaceError(f"{path}: {e}".replace("set detect=false", "pass --no-detect")) from None


def cmd_embed(args: argparse.Namespace) -> int:
    v = _load_verifier(args.checkpoint, args.device)
    items = [_prepared(v, p, args.detect) for p in args.images]
    emb = v.embed(items)
    for p, item, e in zip(args.images, items, emb):
        print(json.dumps({"image": p, "dim": len(e), "face": item.face_json(),
                          "embedding": [round(float(x), 6) for x in e]}))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    v = _load_verifier(args.checkpoint, args.device)
    th: Any = args.threshold
    if th is not None:
        try:
            th = float(th)
        except ValueError:
            pass
    v.resolve_threshold(th)  # a bad threshold fails before any detection
    items = [_prepared(v, p, args.detect) for p in (args.image1, args.image2)]
    e = v.embed(items)
    res = {**v.compare(e[0], e[1], th), "face1": items[0].face_json(), "face2": items[1].face_json()}
    if args.json:
        print(json.dumps(res))
    else:
        faces = "".join(f"  image{i}: face score {f['score']:.3f} of {f['faces_found']} found"
                        for i, f in ((1, res["face1"]), (2, res["face2"])) if f)
        print(f"similarity {res['similarity']:.4f}  threshold {res['threshold']:.4f} "
              f"({res['threshold_name']})  -> {'MATCH' if res['match'] else 'NO MATCH'}{faces}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Find the faces of every image in the folders now, so training runs and jobs read them from
    the cache; print what was found, and list the images without a face."""
    from faceid.data import scan_folder
    from faceid.facecache import FaceCache, find_faces
    from faceid.faces import DetectorSpec
    from faceid.runtime import resolve_device

    device = resolve_device(args.device)
    spec = DetectorSpec()
    total = {"images": 0, "with_face": 0, "no_face": 0, "unreadable": 0}
    for root in args.folders:
        folder = scan_folder(root, what="folder", min_identities=1)
        found = find_faces(folder.paths, spec, workers=args.workers, device=device, what=root)
        counts = {"images": len(found), "with_face": sum(bool(f) for f in found),
                  "no_face": sum(f is not None and not f for f in found), "unreadable": sum(f is None for f in found)}
        for k in total:
            total[k] += counts[k]
        print(json.dumps({"folder": root, **counts,
                          "several_faces": sum(f is not None and len(f) > 1 for f in found)}))
        for p, f in zip(folder.paths, found):
            if f is not None and not f:
                print(json.dumps({"no_face": str(p)}))
    cache = FaceCache(spec)
    print(json.dumps({"total": total, "cache": str(cache.path)}))
    cache.close()
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
    for flag, name in (("infer_replicas", "FACEID_INFER_REPLICAS"), ("infer_port", "FACEID_INFER_PORT"),
                       ("infer_host", "FACEID_INFER_HOST")):
        if getattr(args, flag) is not None:
            os.environ[name] = str(getattr(args, flag))
    import uvicorn

    uvicorn.run("app.main:create_app", factory=True, host=host, port=port,
                log_level=args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="faceid", description="Train and serve face verification.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train a model (all flags: faceid train --help)", add_help=False)

    ckpt_default = os.path.join("models", "backbone_best.pt")
    e = sub.add_parser("evaluate", help="score a checkpoint on a folder and/or a pairs file",
                       description="Score a checkpoint on balanced pairs sampled from --val and/or on a "
                       "pairs file. The pairs are sampled, and images embedded (mirror averaging too), "
                       "as the training's evaluation did: for the same checkpoint and --val the numbers "
                       "are those of its metrics.jsonl.")
    e.add_argument("checkpoint", nargs="?", default=ckpt_default,
                   help=f"backbone_best.pt or last.pt written by faceid train (default: {ckpt_default})")
    e.add_argument("--val", metavar="FOLDER", help="ImageFolder root; balanced pairs are sampled from it")
    e.add_argument("--pairs_file", metavar="FILE", help="LFW pairs.txt-style protocol (a relative path not found as "
                   "given is taken inside --val)")
    e.add_argument("--pairs_root", metavar="DIR",
                   help="image root of --pairs_file (default: its folder, then --val)")
    e.add_argument("--pairs_folds", type=int, nargs="+", metavar="N",
                   help="1-based folds of --pairs_file to use (default: all)")
    e.add_argument("--eval_pairs", type=int, default=None, metavar="N",
                   help="balanced pairs sampled from --val (default: the checkpoint's eval_pairs, "
                   f"else {TrainConfig.model_fields['eval_pairs'].default})")
    e.add_argument("--seed", type=int, default=None, metavar="N",
                   help="seed of the sampled pairs (default: the checkpoint's seed, else "
                   f"{TrainConfig.model_fields['seed'].default})")
    e.add_argument("--workers", type=int, default=2, metavar="N",
                   help="image-decoding worker processes (default: 2)")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    e.set_defaults(func=cmd_evaluate)

    m = sub.add_parser("embed", help="print the embedding of one or more images (JSON lines)")
    m.add_argument("images", nargs="+")
    m.add_argument("--checkpoint", default=ckpt_default)
    m.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    m.add_argument("--no-detect", dest="detect", action="store_false",
                   help="the images are aligned face crops already: skip face detection")
    m.set_defaults(func=cmd_embed)

    v = sub.add_parser("verify", help="are two images the same person? (the checkpoint's threshold)")
    v.add_argument("image1")
    v.add_argument("image2")
    v.add_argument("--checkpoint", default=ckpt_default)
    v.add_argument("--threshold", help="cosine in [-1, 1] or acc | far_1e-2 | far_1e-3, or pairs_acc for a model trained "
                   "with a pairs file (default acc)")
    v.add_argument("--json", action="store_true", help="print a JSON object")
    v.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    v.add_argument("--no-detect", dest="detect", action="store_false",
                   help="the images are aligned face crops already: skip face detection")
    v.set_defaults(func=cmd_verify)

    r = sub.add_parser("prepare", help="find the faces in dataset folders ahead of training (cached)",
                       description="Detect the faces (five landmarks) of every image in each ImageFolder "
                       "root and keep them in the face cache (FACEID_CACHE_DIR, default ~/.cache/faceid), "
                       "so training runs and jobs with --align arcface start at once. Prints one JSON "
                       "line per folder with its counts, and one per image where no face was found.")
    r.add_argument("folders", nargs="+", metavar="FOLDER", help="ImageFolder root (one sub-folder per person)")
    r.add_argument("--workers", type=int, default=2, metavar="N", help="detection processes (default: 2)")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    r.set_defaults(func=cmd_prepare)

    s = sub.add_parser("serve", help="start the REST service (settings: FACEID_* environment)")
    s.add_argument("--host", default=None, help="address to listen on (default FACEID_HOST, else 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port to listen on (default FACEID_PORT, else 8000)")
    s.add_argument("--log-level", default="info")
    s.add_argument("--infer_replicas", type=int, default=None, metavar="N",
                   help="also start N inference replicas answering /embed, /embed/batch and /verify on "
                   "--infer_port (FACEID_INFER_REPLICAS; docs/SERVICE.md)")
    s.add_argument("--infer_port", type=int, default=None, help="the replicas' port (FACEID_INFER_PORT)")
    s.add_argument("--infer_host", default=None, help="the replicas' address (FACEID_INFER_HOST, default 127.0.0.1)")
    s.set_defaults(func=cmd_serve)
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
