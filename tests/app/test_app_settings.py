"""Settings from the environment, checked at start; the app factory has no import-time effects."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from service_helpers import running

from app.settings import Settings, load_settings, prepare_dirs
from faceid.errors import ConfigError


def test_defaults():
    s = load_settings({})
    assert s.data_dir == Path("data") and s.models_dir == Path("models")
    assert s.api_key is None and s.max_upload_mb == 10 and s.checkpoint is None
    assert s.trainer_cmd == (sys.executable, "-m", "faceid.train")
    assert s.max_upload_bytes == 10 * 1024 * 1024
    assert s.batch_wait_ms == 5 and s.compile == "off" and s.infer_workers == 0


def test_values_from_environment(tmp_path):
    s = load_settings(
        {
            "FACEID_DATA_DIR": str(tmp_path),
            "FACEID_MODELS_DIR": str(tmp_path / "m"),
            "FACEID_API_KEY": "abcdefgh12",
            "FACEID_MAX_UPLOAD_MB": "2.5",
            "FACEID_MAX_PIXELS": "1000000",
            "FACEID_CHECKPOINT": "x.pt",
            "FACEID_BATCH_MAX_SIZE": "4",
            "FACEID_BATCH_WAIT_MS": "0",
            "FACEID_INFER_WORKERS": "3",
            "FACEID_PUBLIC_DOCS": "yes",
            "FACEID_DEVICE": "cpu",
            "FACEID_COMPILE": "Freeze",
            "FACEID_TRAINER_CMD": "python3 '/opt/my trainer.py'",
        }
    )
    assert s.data_dir == tmp_path and s.max_upload_mb == 2.5 and s.max_pixels == 1_000_000
    assert s.checkpoint == Path("x.pt") and s.batch_max_size == 4 and s.batch_wait_ms == 0 and s.infer_workers == 3
    assert (
        s.public_docs
        and s.device == "cpu"
        and s.compile == "freeze"
        and s.trainer_cmd == ("python3", "/opt/my trainer.py")
    )
    assert "abcdefgh12" not in repr(s)


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"FACEID_MAX_UPLOAD_MB": "ten"}, "FACEID_MAX_UPLOAD_MB"),
        ({"FACEID_MAX_UPLOAD_MB": "-1"}, "out of range"),
        ({"FACEID_MAX_UPLOAD_MB": "nan"}, "out of range"),
        ({"FACEID_MAX_PIXELS": "1.5"}, "whole number"),
        ({"FACEID_MAX_PIXELS": "100000000"}, "above the 89,478,485 pixels the image decoder .Pillow. accepts"),
        ({"FACEID_BATCH_MAX_SIZE": "0"}, "FACEID_BATCH_MAX_SIZE"),
        ({"FACEID_INFER_WORKERS": "-1"}, "FACEID_INFER_WORKERS"),
        ({"FACEID_INFER_WORKERS": "two"}, "FACEID_INFER_WORKERS"),
        ({"FACEID_API_KEY": "short"}, "too short"),
        ({"FACEID_DEVICE": "tpu"}, "FACEID_DEVICE"),
        ({"FACEID_COMPILE": "max-autotune"}, "FACEID_COMPILE.*use off, freeze or cudagraph"),
        ({"FACEID_COMPILE": "cudagraph", "FACEID_DEVICE": "cpu"}, "cudagraph needs a CUDA GPU.*off or freeze"),
        ({"FACEID_PUBLIC_DOCS": "maybe"}, "FACEID_PUBLIC_DOCS"),
    ],
)
def test_bad_values_name_the_variable(env, needle):
    with pytest.raises(ConfigError, match=needle):
        load_settings(env)


def test_short_key_message_does_not_echo_it():
    with pytest.raises(ConfigError) as e:
        load_settings({"FACEID_API_KEY": "pw123"})
    assert "pw123" not in str(e.value)


def test_unwritable_models_dir_is_a_clear_error_at_start(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="FACEID_MODELS_DIR"):
        prepare_dirs(Settings(models_dir=blocker / "models"))


@pytest.mark.anyio
async def test_app_refuses_to_start_with_unwritable_models_dir(make_app, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="not writable"):
        async with running(make_app(models_dir=blocker / "models")):
            pass


def test_prepare_dirs_makes_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = prepare_dirs(Settings(models_dir=Path("m"), data_dir=Path("d")))
    assert s.models_dir == tmp_path / "m" and (tmp_path / "m" / "jobs").is_dir()
    assert s.data_dir == tmp_path / "d"


def test_import_has_no_side_effects(tmp_path):
    """Importing app.main reads no settings, creates no folder and imports no torch."""
    code = (
        "import sys, app.main, app.routes.inference, app.model_manager, app.batcher; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "a = app.main.create_app(); assert 'torch' not in sys.modules; print('ok')"
    )
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(root), "FACEID_MODELS_DIR": str(tmp_path / "never")},
    )
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "never").exists() and not (tmp_path / "models").exists()


def test_inference_plan():
    """Two forward passes at once by default on a CPU with 2+ cores, each on half of them; one on a
    GPU; an explicit FACEID_INFER_WORKERS wins on a CPU, the cores shared out between its workers."""
    import os

    from app.model_manager import inference_plan

    cores = len(os.sched_getaffinity(0))
    assert inference_plan(0, "cpu") == ((2, cores // 2) if cores >= 2 else (1, 1))
    assert inference_plan(1, "cpu") == (1, cores)
    assert inference_plan(2, "cuda") == (1, cores)
    assert inference_plan(2, "cpu") == (2, max(1, cores // 2))
    assert inference_plan(4, "cpu") == (4, max(1, cores // 4))


@pytest.mark.anyio
@pytest.mark.parametrize("cores,threads", [(1, 2), (2, 2), (4, 4)])
async def test_uploads_are_decoded_on_one_thread_per_core(monkeypatch, tmp_path, cores, threads):
    """As many uploads are decoded at once as there are cores (at least two), so a many-core host
    serving a GPU is not held to two decoding threads; one more waits for a free thread."""
    import io
    import threading

    import anyio
    from PIL import Image
    from service_helpers import fake_loader, service_settings

    import app.model_manager as model_manager
    from app.store import JobStore

    monkeypatch.setattr(model_manager, "usable_cpus", lambda: cores)
    manager = model_manager.ModelManager(
        service_settings(models_dir=tmp_path), JobStore(tmp_path / "jobs.db"), loader=fake_loader
    )
    together = threading.Barrier(threads, timeout=5)  # passes only if `threads` decodes run at once
    running, peak, entered, lock = [0], [0], [0], threading.Lock()

    class Model:
        def prepare(self, img):
            with lock:
                running[0] += 1
                entered[0] += 1
                first = entered[0] <= threads
                peak[0] = max(peak[0], running[0])
            try:
                if first:
                    together.wait()
            finally:
                with lock:
                    running[0] -= 1
            return img

    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "PNG")
    served = model_manager.ServedModel(
        id="m", job_id=None, checkpoint="-", source="env", pinned=False, loaded_at=0.0, verifier=Model()
    )
    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(threads + 1):
                    tg.start_soon(manager.decode, buf.getvalue(), f"image{i}", served)
        assert peak[0] == threads
    finally:
        manager.close()
