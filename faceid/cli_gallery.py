"""`faceid gallery`: enrol a folder of people and identify a folder of photos, offline.

Works on the same gallery database as the server (MODELS_DIR/galleries.db) while no server uses
that models folder (the server's lock file says so): the server keeps its galleries in memory and
would not see changes made behind its back.

    faceid gallery enroll  FOLDER --gallery staff --checkpoint models/.../backbone_best.pt
    faceid gallery identify FOLDER --gallery staff --checkpoint ...      # summary, one line per photo
    faceid gallery import  FILE.npz --gallery staff --checkpoint ...     # precomputed embeddings
    faceid gallery list
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

from faceid.cli_common import add_min_face, detector_for, no_face_for_cli
from faceid.errors import ConfigError, ImageError
from faceid.faces import Photo
from faceid.gallery import (
    RULE,
    BadInput,
    GalleryError,
    check_gallery_name,
    check_person_name,
    checkpoint_model_id,
    normalize_rows,
    prepare_faces,
)
from faceid.gallery_store import GalleryStore, NewFace
from faceid.images import is_image_file

BATCH = 16
DETECT_CHUNK = 8  # photos detected in one call (faceid.facecache detects in groups of 8 too)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def _open_store(models_dir: str) -> GalleryStore:
    if (os.environ.get("FACEID_DATABASE_URL") or "").strip():
        raise ConfigError(
            "FACEID_DATABASE_URL is set: the galleries live in that PostgreSQL database, which a server "
            "serves; use its /galleries routes, or unset FACEID_DATABASE_URL for the models folder's galleries.db"
        )
    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    lock = root / "server.lock"
    if lock.exists():
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            raise ConfigError(f"a FaceID server is using {root}; use its /galleries routes, or stop it first") from None
        finally:
            os.close(fd)
    return GalleryStore(root / "galleries.db")


def _verifier(args: argparse.Namespace):
    from faceid.inference import Verifier

    return Verifier.from_checkpoint(args.checkpoint, device=args.device)


def _faces(v: Any, path: Path, detect: bool, all_faces: bool, detector: Any = None):
    try:
        return prepare_faces(v, v.read(str(path), detect, detector), detect, all_faces, detector)
    except ImageError as e:
        raise ImageError(no_face_for_cli(f"{path}: {e}")) from None


def _largest_faces(v: Any, paths: list[Path], detect: bool, detector: Any) -> list[Any]:
    """Per photo, its largest face as `_faces` gives it, or the ImageError that refuses the photo.
    A model that finds faces finds those of all `paths` with one detector call."""
    if not (detect and detector is not None):
        out: list[Any] = []
        for path in paths:
            try:
                out.append(_faces(v, path, detect, False)[0])
            except ImageError as e:
                out.append(e)
        return out
    photos: list[Any] = []
    for path in paths:
        try:
            photos.append(v.read(str(path), True, detector))
        except ImageError as e:
            photos.append(ImageError(f"{path}: {e}"))
    readable = [p for p in photos if not isinstance(p, ImageError)]
    found = iter(Photo.faces_of(detector, readable))
    out = []
    for path, photo in zip(paths, photos):
        if isinstance(photo, ImageError):
            out.append(photo)
            continue
        try:
            out.append(prepare_faces(v, photo, True, False, detector, next(found))[0])
        except ImageError as e:
            out.append(ImageError(no_face_for_cli(f"{path}: {e}")))
    return out


def _bound_model(store: GalleryStore, gallery: str, model: str, create: bool) -> Optional[str]:
    if store.gallery(gallery) is None:
        if not create:
            raise ConfigError(f"no gallery {gallery!r} in {store.path}; enroll a folder into it first")
        store.create_gallery(gallery)
    bound, _ = store.meta(gallery)
    if bound is not None and bound != model:
        raise ConfigError(
            f"gallery {gallery!r} holds embeddings of model {bound}; this checkpoint is model "
            f"{model}. Embeddings of two models are never compared: use that model's checkpoint, "
            "or let the server re-embed the gallery by serving this one"
        )
    return bound


def cmd_enroll(args: argparse.Namespace) -> int:
    check_gallery_name(args.gallery)
    folder = Path(args.folder)
    people = sorted(d for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []
    if not people:
        raise ConfigError(f"{folder} has no sub-folders: give a folder with one sub-folder of photos per person")
    v = _verifier(args)
    model = checkpoint_model_id(args.checkpoint)
    store = _open_store(args.models_dir)
    bound = _bound_model(store, args.gallery, model, create=True)
    detector = detector_for(v, args.min_face)
    enrolled = skipped = 0
    for d in people:
        check_person_name(d.name)
        faces: list[NewFace] = []
        paths = _images(d)[: args.max_per_person or None]
        chunks = (paths[s : s + DETECT_CHUNK] for s in range(0, len(paths), DETECT_CHUNK))
        for path, f in (
            (p, f) for chunk in chunks for p, f in zip(chunk, _largest_faces(v, chunk, args.detect, detector))
        ):
            if isinstance(f, ImageError):
                skipped += 1
                print(f"skipped: {f}", file=sys.stderr)
                continue
            faces.append(
                NewFace(
                    vector=np.zeros(0),
                    source=str(path.relative_to(folder))[:255],
                    crop=f.crop,
                    kind=f.kind,
                    face=f.face,
                )
            )
            faces[-1].prepared = f.prepared  # type: ignore[attr-defined]
        for s in range(0, len(faces), BATCH):
            chunk = faces[s : s + BATCH]
            vectors = normalize_rows(v.embed([f.prepared for f in chunk]))  # type: ignore[attr-defined]
            for f, vec in zip(chunk, vectors):
                f.vector = vec
            store.add_faces(args.gallery, d.name, model, chunk)
            if bound is None:
                store.bind(args.gallery, model, vectors.shape[1])
                bound = model
        enrolled += len(faces)
    g = store.gallery(args.gallery)
    assert g is not None  # enrolled into just now
    print(
        json.dumps(
            {
                "gallery": args.gallery,
                "model": model,
                "enrolled_faces": enrolled,
                "skipped_images": skipped,
                "people": g["people"],
                "faces": g["faces"],
            }
        )
    )
    return 0


def cmd_identify(args: argparse.Namespace) -> int:
    check_gallery_name(args.gallery)
    folder = Path(args.folder)
    v = _verifier(args)
    model = checkpoint_model_id(args.checkpoint)
    store = _open_store(args.models_dir)
    if _bound_model(store, args.gallery, model, create=False) is None:
        raise ConfigError(f"gallery {args.gallery!r} is empty; enroll a folder into it first")
    dim = store.meta(args.gallery)[1]
    assert dim is not None  # bound to the model (checked above)
    index = store.load_index(args.gallery, model, dim)
    threshold: Any = args.threshold
    try:
        threshold = float(threshold)
    except ValueError:
        pass
    th, th_name = v.resolve_threshold(threshold)
    detector = detector_for(v, args.min_face)
    enrolled = {p["name"] for p in store.people(args.gallery)}
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir())
    items = [(d.name, p) for d in subdirs for p in _images(d)] if subdirs else [(None, p) for p in _images(folder)]
    counts = {
        "probes": 0,
        "no_face": 0,
        "known": 0,
        "known_right": 0,
        "known_rank1": 0,
        "unknown": 0,
        "unknown_right": 0,
    }
    for truth, path in items:
        try:
            faces = _faces(v, path, args.detect, args.all_faces, detector)
        except ImageError as e:
            counts["no_face"] += 1
            print(json.dumps({"image": str(path), "error": str(e)}) if args.json else f"{path}: no face", flush=True)
            continue
        vectors = normalize_rows(v.embed([f.prepared for f in faces]))
        results = index.search(vectors, args.k)
        counts["probes"] += 1
        first = results[0]
        best = first[0] if first else None
        decision = best.person if best is not None and best.score >= th else None
        if truth is not None:
            if truth in enrolled:
                counts["known"] += 1
                counts["known_right"] += int(decision == truth)
                counts["known_rank1"] += int(best is not None and best.person == truth)
            else:
                counts["unknown"] += 1
                counts["unknown_right"] += int(decision is None)
        if args.json:
            print(
                json.dumps(
                    {
                        "image": str(path),
                        "truth": truth,
                        "person": decision,
                        "faces": [
                            {"face": f.face, "candidates": [c.__dict__ for c in r]} for f, r in zip(faces, results)
                        ],
                    }
                )
            )
        elif not args.quiet:
            shown = ", ".join(f"{c.person} {c.score:.3f}" for c in first[:3])
            print(f"{path}: {decision or 'unknown'}  [{shown}]" + (f"  ({len(faces)} faces)" if len(faces) > 1 else ""))
    summary: dict[str, Any] = {
        "gallery": args.gallery,
        "model": model,
        "rule": RULE,
        "threshold": th,
        "threshold_name": th_name,
        **counts,
    }
    if counts["known"]:
        summary["rank1_accuracy"] = round(counts["known_rank1"] / counts["known"], 4)
        summary["identified_at_threshold"] = round(counts["known_right"] / counts["known"], 4)
    if counts["unknown"]:
        summary["unknown_rejected"] = round(counts["unknown_right"] / counts["unknown"], 4)
    print(json.dumps({"summary": summary}))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """FILE.npz with `embeddings` float32 [N, D] and `people` [N] names."""
    check_gallery_name(args.gallery)
    model = args.model or checkpoint_model_id(args.checkpoint)
    dim = None
    if args.checkpoint:
        v = _verifier(args)
        dim = v.embedding_size
        if args.model and args.model != checkpoint_model_id(args.checkpoint):
            raise ConfigError(
                f"--model {args.model} is not --checkpoint's model ({checkpoint_model_id(args.checkpoint)})"
            )
    try:
        data = np.load(args.file, allow_pickle=False)
        emb, people = data["embeddings"], [str(p) for p in data["people"]]
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(f"{args.file}: not an .npz with arrays embeddings [N, D] and people [N] ({e})") from None
    if len(people) != len(emb):
        raise ConfigError(f"{args.file}: {len(emb)} embeddings but {len(people)} names")
    vectors = normalize_rows(emb, dim)
    store = _open_store(args.models_dir)
    bound = _bound_model(store, args.gallery, model, create=True)
    by_person: dict[str, list[NewFace]] = {}
    for name, vec in zip(people, vectors):
        by_person.setdefault(check_person_name(name), []).append(NewFace(vector=vec, source="imported"))
    for name, faces in by_person.items():
        store.add_faces(args.gallery, name, model, faces)
    if bound is None:
        store.bind(args.gallery, model, vectors.shape[1])
    print(json.dumps({"gallery": args.gallery, "model": model, "imported": len(vectors), "people": len(by_person)}))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store = _open_store(args.models_dir)
    for name in store.gallery_names():
        print(json.dumps(store.gallery(name)))
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return args.gallery_func(args)
    except (GalleryError, BadInput) as e:
        raise ConfigError(str(e)) from None


def add_parser(sub: Any) -> None:
    """`faceid gallery ...` under the `faceid` command's sub-parsers."""
    g = sub.add_parser(
        "gallery",
        help="enroll a folder of people, identify a folder of photos (1:N)",
        description="Galleries of enrolled people, offline, in MODELS_DIR/galleries.db (the "
        "server's; stop the server first). docs/GALLERIES.md has the details.",
    )
    gsub = g.add_subparsers(dest="gallery_command", required=True)
    ckpt_default = os.path.join("models", "backbone_best.pt")

    def common(p: argparse.ArgumentParser, checkpoint: bool = True) -> None:
        p.add_argument(
            "--models_dir",
            default=os.environ.get("FACEID_MODELS_DIR", "models"),
            help="where galleries.db lives (default FACEID_MODELS_DIR, else models)",
        )
        if checkpoint:
            p.add_argument("--checkpoint", default=ckpt_default)
            p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
            p.add_argument(
                "--no-detect",
                dest="detect",
                action="store_false",
                help="the photos are aligned face crops already: skip face detection",
            )
            add_min_face(p)
        p.set_defaults(func=run)

    e = gsub.add_parser("enroll", help="enroll FOLDER/<person>/*.jpg into a gallery (created if new)")
    e.add_argument("folder")
    e.add_argument("--gallery", required=True)
    e.add_argument("--max_per_person", type=int, default=0, metavar="N", help="enroll at most N photos each (0: all)")
    common(e)
    e.set_defaults(gallery_func=cmd_enroll)

    i = gsub.add_parser("identify", help="identify every photo of FOLDER (or FOLDER/<person>/ for a scored run)")
    i.add_argument("folder")
    i.add_argument("--gallery", required=True)
    i.add_argument("--threshold", default="far_1e-3", help="far_1e-3 (default) | far_1e-2 | acc | a cosine value")
    i.add_argument("--k", type=int, default=5)
    i.add_argument("--all_faces", action="store_true", help="identify every face of each photo, not only the largest")
    i.add_argument("--json", action="store_true", help="one JSON line per photo")
    i.add_argument("--quiet", action="store_true", help="only the summary")
    common(i)
    i.set_defaults(gallery_func=cmd_identify)

    m = gsub.add_parser("import", help="import precomputed embeddings (.npz: embeddings [N, D], people [N])")
    m.add_argument("file")
    m.add_argument("--gallery", required=True)
    m.add_argument("--model", help="the model id that computed them (default: --checkpoint's)")
    common(m)
    m.set_defaults(gallery_func=cmd_import)

    ls = gsub.add_parser("list", help="the galleries and their counts")
    common(ls, checkpoint=False)
    ls.set_defaults(gallery_func=cmd_list)
