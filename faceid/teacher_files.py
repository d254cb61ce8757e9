"""The distillation teacher's files: where they are and whether they are installed, checked without
importing torch or dlib (the API process checks a job's `distill` before it queues it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from faceid.errors import ConfigError

TEACHERS = ("none", "dlib")
_INSTALL = "pip install 'faceid[teacher]' (dlib-bin and face-recognition-models)"
_FILES = ("shape_predictor_5_face_landmarks.dat", "dlib_face_recognition_resnet_model_v1.dat")


def models_dir() -> Path:
    """The folder of face-recognition-models' .dat files, found without importing the package
    (its __init__ needs setuptools' pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"distill dlib: the package face-recognition-models is not installed; {_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def check_teacher(name: str) -> None:
    """Raise ConfigError naming the fix when the teacher `name` cannot run here."""
    if name == "none":
        return
    if importlib.util.find_spec("dlib") is None:
        raise ConfigError(f"distill dlib: the package dlib is not installed; {_INSTALL}")
    folder = models_dir()
    for f in _FILES:
        if not (folder / f).is_file():
            raise ConfigError(f"distill dlib: {folder / f} is missing; reinstall with {_INSTALL}")
