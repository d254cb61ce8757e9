"""The `faceid` commands that use a trained model: evaluate (a checkpoint on a folder and/or a
pairs file, as its training evaluated it), embed and verify."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any, Optional

from pydantic import ValidationError

from faceid.cli_common import UserError, detector_for, no_face_for_cli, validation_message
from faceid.config import TrainConfig

log = logging.getLogger("faceid")


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
        raise UserError(
            "--pairs_folds selects folds of --pairs_file, which is not given; add --pairs_file "
            "FILE or leave out --pairs_folds"
        )


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
    from faceid.data import scan_folder
    from faceid.errors import DataError
    from faceid.evaluate import EvalPairs, cosine_scores, protocol_folder, score_protocol, score_sampled
    from faceid.imagestore import load_images
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
        folder, store = load_images(
            folder,
            v.img_size,
            workers=args.workers,
            crop=v.crop,
            what="--val",
            min_identities=2,
            min_per_identity=2,
            **_faces_of(v),
        )
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
                    msg = msg.replace("point root at the folder", "give --pairs_root DIR, the folder") + (
                        "" if args.pairs_root else " (or --val DIR)"
                    )
                raise DataError(msg) from None
            raise
        paths = proto.unique_paths()
        folder, store = load_images(
            protocol_folder(paths),
            v.img_size,
            workers=args.workers,
            crop=v.crop,
            what="--pairs_file images",
            min_identities=1,
            no_face="center",
            **_faces_of(v),
        )
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
    return {"align": prep.align, "detector": prep.detector, "device": v.device, "reduced_decode": prep.reduced_decode}


def _embed_store(v, store, config: Optional[dict[str, Any]] = None):
    """Embeddings of every image of `store`, computed as training's evaluation computes them (the
    same function and batch size, up to 512), so that the scores match the training log."""
    from faceid.evaluate import embed_store

    # training evaluates in batches of max(batch_size, 64); a GPU run's 4096 would not fit a laptop
    batch_size = min(max(int(_checkpoint_setting(config or {}, "batch_size")), 64), 512)
    return embed_store(v.model, store, v.transform, batch_size=batch_size, amp_dtype=v.amp_dtype, flip=v.flip)


def _prepared(v, path: str, detect: bool, detector=None):
    """The image at `path` as the checkpoint's model takes it, with the face it was made from
    (found by `detector`, a finer search, where given)."""
    from faceid.faces import NoFaceError

    try:
        return v.prepare_face(v.read(path, detect, detector), detect, detector)
    except NoFaceError as e:
        raise NoFaceError(no_face_for_cli(f"{path}: {e}")) from None


def cmd_embed(args: argparse.Namespace) -> int:
    v = _load_verifier(args.checkpoint, args.device)
    detector = detector_for(v, args.min_face)
    items = [_prepared(v, p, args.detect, detector) for p in args.images]
    emb = v.embed(items)
    for p, item, e in zip(args.images, items, emb):
        print(
            json.dumps(
                {"image": p, "dim": len(e), "face": item.face_json(), "embedding": [round(float(x), 6) for x in e]}
            )
        )
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
    detector = detector_for(v, args.min_face)
    items = [_prepared(v, p, args.detect, detector) for p in (args.image1, args.image2)]
    e = v.embed(items)
    res = {**v.compare(e[0], e[1], th), "face1": items[0].face_json(), "face2": items[1].face_json()}
    if args.json:
        print(json.dumps(res))
    else:
        faces = "".join(
            f"  image{i}: face score {f['score']:.3f} of {f['faces_found']} found"
            for i, f in ((1, res["face1"]), (2, res["face2"]))
            if f
        )
        print(
            f"similarity {res['similarity']:.4f}  threshold {res['threshold']:.4f} "
            f"({res['threshold_name']})  -> {'MATCH' if res['match'] else 'NO MATCH'}{faces}"
        )
    return 0
