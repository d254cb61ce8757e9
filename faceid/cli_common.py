"""What every `faceid` command shares: its argument parser, user errors (one line, `error: ...`,
exit code 2, no traceback), and its logging."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from typing import Any, Callable, Optional

from pydantic import ValidationError

from faceid.events import Failed

EXIT_USER_ERROR = 2
EXIT_TERMINATED = 143


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's error convention: a bad flag is one line, not the whole usage
    (about 30 lines for faceid train) followed by the message. --help is unchanged."""

    def error(self, message: str) -> typing.NoReturn:
        print(f"error: {' '.join(message.split())}; see {self.prog} --help", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def add_min_face(p: argparse.ArgumentParser) -> None:
    """--min_face: the smallest face to look for (faceid.inference.Verifier.detector_for)."""
    p.add_argument(
        "--min_face",
        type=float,
        metavar="PERCENT",
        help="find faces down to this percent of a photo's longer side (default: the model's own, "
        "about 8): smaller finds a small face in a large photo or a group photo's faces, at more "
        "cost (at least 2 with the default detector); larger searches selfies and ID photos for "
        "their large face only, at less cost",
    )


def detector_for(v: Any, min_face: Optional[float]) -> Any:
    """`v.detector_for(min_face)`, a --min_face outside the detector's reach a UserError."""
    if min_face is not None and getattr(v, "detector", None) is not None:
        from faceid.faces import least_min_face

        least = least_min_face(v.preparation.detector)
        if not least <= min_face <= 100:
            raise UserError(f"--min_face {min_face:g}: give a percent from {least:g} to 100")
    return v.detector_for(min_face)


def no_face_for_cli(message: str) -> str:
    """A no-face message with the CLI's flags for the API's fields."""
    return message.replace("set detect=false", "pass --no-detect").replace("with min_face", "with --min_face")


def validation_message(e: ValidationError) -> str:
    """A pydantic ValidationError as one line: each error after the flag it is about."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"--{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


class UserError(Exception):
    """A one-line message for the user; exit code 2."""


def user_error(msg: str, events: Optional[Callable[[Any], None]], kind: str) -> int:
    """Print `msg` as one line, `error: ...`, and give it to `events` (a training command's
    EventWriter) as a failed event of `kind`; returns the exit code."""
    one_line = " ".join(msg.split())
    print(f"error: {one_line}", file=sys.stderr)
    if events:
        events(Failed(kind=kind, error=one_line))
    return EXIT_USER_ERROR


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("FACEID_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
