"""How OpenMP's idle threads wait, chosen before torch (and with it libgomp) is loaded.

Measured by bench/omp_wait.py (bench/README.md, omp_wait): for training, sleeping at once
(OMP_WAIT_POLICY=PASSIVE) is slower when the job has the machine to itself and faster beside a
process that keeps a core busy, where libgomp's default spin loses most. A short spin
(GOMP_SPINCOUNT=10000) keeps the idle speed and recovers most of the loss under load, so
training uses it. The server's own forward passes sleep (PASSIVE): they share the cores with
request handling and with training jobs. Whatever a user sets wins.
"""

from __future__ import annotations

import os
from typing import MutableMapping, Optional, TypeVar

TRAIN_SPINCOUNT = "10000"
# Set beside OMP_WAIT_POLICY when the server chose PASSIVE itself, so its training jobs do not inherit it.
SERVER_MARK = "FACEID_SERVER_SET_OMP_WAIT_POLICY"

Env = TypeVar("Env", bound=MutableMapping[str, str])


def _env(environ: Optional[MutableMapping[str, str]]) -> MutableMapping[str, str]:
    return os.environ if environ is None else environ


def training_defaults(environ: Optional[MutableMapping[str, str]] = None) -> None:
    """A short spin for a training process, unless the wait policy or spin count is already set."""
    env = _env(environ)
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["GOMP_SPINCOUNT"] = TRAIN_SPINCOUNT


def serving_defaults(environ: Optional[MutableMapping[str, str]] = None) -> None:
    """Sleeping threads for the server, unless the wait policy or spin count is already set."""
    env = _env(environ)
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        env[SERVER_MARK] = "1"


def training_child_env(environ: Env) -> Env:
    """A training job's environment made from the server's (in place): the server's own PASSIVE
    default removed, the training default applied; a user's explicit setting is kept."""
    if environ.pop(SERVER_MARK, None) and environ.get("OMP_WAIT_POLICY") == "PASSIVE":
        del environ["OMP_WAIT_POLICY"]
    training_defaults(environ)
    return environ
