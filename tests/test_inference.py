"""faceid.inference.Verifier on a checkpoint from a tiny real training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from core_fixtures import sample_images, tiny_arcface_run
from PIL import Image

from faceid.checkpoint import load_checkpoint
from faceid.errors import CheckpointError, ConfigError
from faceid.evaluate import embed_store, protocol_folder
from faceid.images import open_image
from faceid.imagestore import load_images
from faceid.inference import Verifier


def _atol(v: Verifier, fp32: float) -> float:
    """Tolerance between two ways of computing the same embeddings: `fp32` in full precision; with
    bf16 autocast (a CPU with native bf16, or a GPU) kernels chosen by batch size or a compiled
    graph round differently (up to ~1e-3 seen on a Zen 4 CPU)."""
    return fp32 if v.amp_dtype is None else max(fp32, 5e-3)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_arcface_run(tmp_path_factory)


@pytest.fixture(scope="module")
def verifier(run):
    return Verifier.from_checkpoint(run.best, device="cpu")


@pytest.fixture(scope="module")
def ckpt(run):
    return load_checkpoint(run.best)


@pytest.fixture(scope="module")
def images():
    return [open_image(p) for p in sample_images(3)]


def test_info_describes_the_checkpoint(verifier, run, ckpt):
    ck = ckpt
    info = verifier.info
    assert info["checkpoint"] == str(run.best)
    assert info["epoch"] == ck["epoch"] == 1
    assert info["img_size"] == 32 and info["embedding_size"] == run.cfg.embedding_size
    assert info["thresholds"] == ck["thresholds"]
    assert info["metrics"]["acc"] == ck["metrics"]["acc"]
    assert info["train_mode"] == "arcface" and info["config"]["img_size"] == 32


def test_embed_gives_unit_norm_float32(verifier, images):
    emb = verifier.embed(images)
    assert emb.shape == (3, verifier.embedding_size) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert verifier.embed([]).shape == (0, verifier.embedding_size)


def test_same_image_is_a_perfect_match(verifier, images):
    res = verifier.verify(images[0], images[0])
    assert res["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert res["match"] is True


def test_default_threshold_is_the_checkpoints_acc_threshold(verifier, ckpt, images):
    ck = ckpt
    th = ck["thresholds"]["acc"]
    assert th == pytest.approx(ck["metrics"]["th"]) and -1.0 <= th <= 1.0
    res = verifier.verify(images[0], images[2])
    assert res["threshold"] == pytest.approx(th) and res["threshold_name"] == "acc"
    assert res["match"] == (res["similarity"] >= res["threshold"])
    e = verifier.embed([images[0], images[2]])
    assert res["similarity"] == pytest.approx(float(e[0] @ e[1]), abs=1e-5)
    assert verifier.verify(images[0], images[2], "acc") == res


@pytest.mark.parametrize("name", ["far_1e-2", "far_1e-3"])
def test_named_far_thresholds(verifier, ckpt, images, name):
    ck = ckpt
    res = verifier.verify(images[0], images[1], name)
    assert res["threshold_name"] == name
    assert res["threshold"] == pytest.approx(ck["thresholds"][name])
    assert res["threshold"] == pytest.approx(ck["metrics"][f"th_{name}"])  # e.g. th_far_1e-2
    assert res["match"] == (res["similarity"] >= res["threshold"])


@pytest.mark.parametrize("th", [-1.0, 0.25, 1.0])
def test_float_threshold(verifier, images, th):
    res = verifier.verify(images[0], images[1], th)
    assert res["threshold"] == th and res["threshold_name"] == "custom"
    assert res["match"] == (res["similarity"] >= th)


@pytest.mark.parametrize("bad", ["bogus", "ACC", "far_1e-4", 1.5, -1.01, float("nan")])
def test_invalid_thresholds_raise_config_error(verifier, images, bad):
    with pytest.raises(ConfigError) as ei:
        verifier.verify(images[0], images[1], bad)
    assert "acc" in str(ei.value)


def test_embedding_equals_the_one_used_in_evaluation(verifier):
    """Served embeddings must be the evaluation embeddings, or the learned threshold is off."""
    paths = sample_images(4)
    folder, store = load_images(
        protocol_folder(paths), verifier.img_size, workers=0, cache="on", what="test", min_identities=1
    )
    assert len(folder) == 4
    eval_emb = embed_store(
        verifier.model, store, verifier.transform, batch_size=64, amp_dtype=verifier.amp_dtype, flip=verifier.flip
    )
    served = verifier.embed([verifier.open(p) for p in paths])  # as the server and the CLI read them
    np.testing.assert_allclose(served, eval_emb, atol=1e-5)
    # a plain PIL image read from disk is decoded at full scale (these 154 px JPEGs are read at
    # half scale for a 32 px model): the same face within a hair
    with Image.open(paths[0]) as im:
        plain = verifier.embed([im])
    np.testing.assert_allclose(plain[0], eval_emb[0], atol=1e-3)


def test_embedding_does_not_depend_on_the_batch(verifier, images):
    together = verifier.embed(images)
    alone = np.concatenate([verifier.embed([im]) for im in images])
    np.testing.assert_allclose(together, alone, atol=_atol(verifier, 1e-5))


def test_prepared_images_embed_exactly_as_the_photos(verifier, images):
    prepared = [verifier.prepare(im) for im in images]
    assert all(t.dtype == torch.uint8 and t.shape == (3, 32, 32) for t in prepared)
    np.testing.assert_array_equal(verifier.embed(prepared), verifier.embed(images))
    mixed = verifier.embed([prepared[0], images[1]])  # a batch may hold both
    np.testing.assert_array_equal(mixed, verifier.embed(images[:2]))


def test_one_or_two_images_run_on_one_compute_thread_and_the_setting_comes_back(verifier, images):
    seen: list[int] = []
    hook = verifier.model.register_forward_pre_hook(lambda m, a: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        verifier.embed(images[:1])
        verifier.embed(images[:2])
        verifier.embed(images[:3])
        assert torch.get_num_threads() == 2
    finally:
        hook.remove()
        torch.set_num_threads(before)
    assert seen == [1, 1, 2]


def test_a_concurrent_verifier_runs_forward_passes_at_once_and_embeds_the_same(run, verifier, images):
    """concurrent=True (a server's inference workers): two threads' forward passes overlap, no
    thread count is switched for small batches, and every embedding equals the serial one."""
    import threading
    import time

    v = Verifier.from_checkpoint(run.best, device="cpu")
    v.concurrent = True
    inside, overlapped, threads = [0], [False], []
    guard = threading.Lock()

    def pre(m, a):
        with guard:
            inside[0] += 1
            overlapped[0] |= inside[0] > 1
            threads.append(torch.get_num_threads())
        time.sleep(0.2)  # long enough for the other thread's pass to start

    def post(m, a, out):
        with guard:
            inside[0] -= 1

    hooks = [v.model.register_forward_pre_hook(pre), v.model.register_forward_hook(post)]
    before = torch.get_num_threads()
    results: dict[int, np.ndarray] = {}
    try:
        workers = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, v.embed(images[i : i + 2]))) for i in range(2)
        ]
        for t in workers:
            t.start()
        for t in workers:
            t.join(60)
    finally:
        for h in hooks:
            h.remove()
    assert overlapped[0], "the two forward passes did not run at once"
    assert threads == [before, before]  # small batches keep the process's setting
    for i in range(2):
        np.testing.assert_allclose(results[i], verifier.embed(images[i : i + 2]), atol=1e-5)


def test_last_checkpoint_loads_too(run):
    v = Verifier.from_checkpoint(run.last, device="cpu")
    assert v.epoch == 1 and "acc" in v.thresholds


def test_bad_checkpoint_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Verifier.from_checkpoint(tmp_path / "nope.pt", device="cpu")


def test_checkpoint_with_wrong_model_weights(ckpt, tmp_path):
    from faceid.checkpoint import save_checkpoint

    ck = {**ckpt, "model": {"embed.0.weight": torch.zeros(4, 4)}}
    p = save_checkpoint(ck, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        Verifier.from_checkpoint(p, device="cpu")


def test_compiled_verifier_matches_eager(run, verifier, images):
    """compile="freeze": every padded batch size is compiled by warmup() and the embeddings equal
    the eager ones (batch norm folded into the convolutions changes only rounding)."""
    fast = Verifier.from_checkpoint(run.best, device="cpu", compile="freeze")
    views = 2 if fast.flip else 1
    assert fast.warmup(3) == len({1 << (b * views - 1).bit_length() for b in (1, 2, 3)})
    for batch in (images[:1], images):  # 3 images: padded to the next power of two
        np.testing.assert_allclose(fast.embed(batch), verifier.embed(batch), atol=_atol(fast, 1e-4))
    with pytest.raises(ConfigError, match="compile='jit'"):
        Verifier.from_checkpoint(run.best, device="cpu", compile="jit")


def test_cuda_graphs_are_refused_on_a_cpu_with_the_fix_named(run):
    with pytest.raises(ConfigError, match="needs a CUDA GPU; use compile off"):
        Verifier.from_checkpoint(run.best, device="cpu", compile="cudagraph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_verifier_embeds_as_the_eager_one_on_the_gpu(run, images):
    """compile="cudagraph": warmup() records a graph per padded batch size; replays give the eager
    embeddings (same autocast dtype), padding rows left by a larger batch change nothing, and an
    answer is not overwritten by the next replay."""
    eager = Verifier.from_checkpoint(run.best, device="cuda")
    graphs = Verifier.from_checkpoint(run.best, device="cuda", compile="cudagraph")
    views = 2 if graphs.flip else 1
    assert graphs.warmup(3) == len({1 << (b * views - 1).bit_length() for b in (1, 2, 3)})
    one = graphs.embed(images[:1])
    three = graphs.embed(images)  # padded to 4 (or 8 with eval_flip)
    for got, batch in ((one, images[:1]), (three, images)):
        cos = (got * eager.embed(batch)).sum(axis=1)
        assert cos.min() > 0.999, cos
    np.testing.assert_array_equal(graphs.embed(images[:1]), one)
    np.testing.assert_array_equal(three[:1], graphs.embed(images)[:1])


def test_a_flat_neck_checkpoint_serves_what_its_network_computes(ckpt, tmp_path, images):
    """The Verifier builds the neck the checkpoint names (and sizes it by its img_size)."""
    from faceid.checkpoint import save_checkpoint
    from faceid.inference import to_uint8_tensor
    from faceid.model import EmbeddingNet

    torch.manual_seed(1)
    size = 64  # a 2 x 2 last feature map (at the tiny run's 32 px, flat and gap both see 2048 numbers)
    net = EmbeddingNet(ckpt["embedding_size"], neck="flat", img_size=size).eval()
    flat = {
        **ckpt,
        "img_size": size,
        "model": net.state_dict(),
        "config": {**ckpt["config"], "img_size": size, "neck": "flat", "channels_last": False, "eval_flip": False},
    }
    v = Verifier.from_checkpoint(save_checkpoint(flat, tmp_path / "flat.pt"), device="cpu", amp="off")
    assert v.model.neck == "flat"
    x = to_uint8_tensor(images[0], size).unsqueeze(0)
    with torch.no_grad():
        want = torch.nn.functional.normalize(net(v.transform(x)), dim=1).numpy()
    np.testing.assert_allclose(v.embed([images[0]]), want, atol=1e-5)
    # the same weights labelled gap do not fit, and say so
    p = save_checkpoint({**flat, "config": {**flat["config"], "neck": "gap"}}, tmp_path / "mislabelled.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        Verifier.from_checkpoint(p, device="cpu")
    p = save_checkpoint({**flat, "config": {**flat["config"], "neck": "mean"}}, tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match="neck 'mean'"):
        Verifier.from_checkpoint(p, device="cpu")


def test_a_checkpoint_from_before_the_neck_option_is_gap(ckpt, tmp_path, images, verifier):
    from faceid.checkpoint import save_checkpoint

    config = {k: v for k, v in ckpt["config"].items() if k not in ("neck", "dropout")}
    v = Verifier.from_checkpoint(save_checkpoint({**ckpt, "config": config}, tmp_path / "old.pt"), device="cpu")
    assert v.model.neck == "gap"
    np.testing.assert_allclose(v.embed(images), verifier.embed(images), atol=1e-6)


def test_a_checkpoint_trained_with_a_crop_serves_with_it(ckpt, tmp_path, images, verifier):
    """The crop is part of the model: uploads are cropped as the training images were, and the
    served embeddings are the evaluation embeddings of images decoded with that crop."""
    from faceid.checkpoint import save_checkpoint
    from faceid.inference import to_uint8_tensor

    path = save_checkpoint({**ckpt, "crop": 0.6, "config": {**ckpt["config"], "crop": 0.6}}, tmp_path / "crop.pt")
    v = Verifier.from_checkpoint(path, device="cpu")
    assert v.crop == 0.6 and v.info["crop"] == 0.6 and verifier.crop == 1.0
    prepared = v.prepare(images[0])
    assert torch.equal(prepared, to_uint8_tensor(images[0], 32, 0.6))
    assert not torch.equal(prepared, verifier.prepare(images[0]))
    paths = sample_images(3)
    _, store = load_images(
        protocol_folder(paths), v.img_size, workers=0, crop=0.6, cache="on", what="test", min_identities=1
    )
    eval_emb = embed_store(v.model, store, v.transform, batch_size=64, amp_dtype=v.amp_dtype, flip=v.flip)
    np.testing.assert_allclose(v.embed([open_image(p) for p in paths]), eval_emb, atol=1e-5)
    assert np.abs(v.embed(images) - verifier.embed(images)).max() > 1e-3  # same weights, other pixels


def test_a_checkpoint_from_before_the_crop_option_sees_the_whole_image(ckpt, tmp_path, images, verifier):
    from faceid.checkpoint import save_checkpoint

    old = {k: v for k, v in ckpt.items() if k != "crop"}
    old["config"] = {k: v for k, v in ckpt["config"].items() if k != "crop"}
    v = Verifier.from_checkpoint(save_checkpoint(old, tmp_path / "old.pt"), device="cpu")
    assert v.crop == 1.0
    np.testing.assert_array_equal(v.embed(images), verifier.embed(images))


@pytest.mark.parametrize("bad", [1.5, 0.0, "wide", None])
def test_a_checkpoint_with_an_impossible_crop_is_refused(ckpt, tmp_path, bad):
    from faceid.checkpoint import save_checkpoint

    path = save_checkpoint({**ckpt, "crop": bad}, tmp_path / "bad_crop.pt")
    with pytest.raises(CheckpointError, match="malformed"):
        Verifier.from_checkpoint(path, device="cpu")


def test_a_large_photo_is_served_as_its_evaluation_decoded_it(verifier, tmp_path):
    """A large JPEG is decoded at a reduced scale by evaluation and serving alike (so served
    embeddings stay the evaluation ones), and the result is within a grey level of a full
    decode (so the model sees the same face)."""
    from faceid.data import resize_center_crop

    src = open_image(sample_images(1)[0])
    path = tmp_path / "person" / "big.jpg"
    path.parent.mkdir()
    src.resize((src.width * 8, src.height * 8), Image.BICUBIC).save(path, quality=92)  # 1232 px
    opened = verifier.open(path.read_bytes())
    assert opened.size == (154, 154)  # 1/8 scale: still over twice the 32 px input
    _, store = load_images(
        protocol_folder([path]), verifier.img_size, workers=0, cache="on", what="test", min_identities=1
    )
    eval_emb = embed_store(
        verifier.model, store, verifier.transform, batch_size=64, amp_dtype=verifier.amp_dtype, flip=verifier.flip
    )
    np.testing.assert_allclose(verifier.embed([opened]), eval_emb, atol=1e-5)
    np.testing.assert_allclose(verifier.embed([verifier.open(path)]), eval_emb, atol=1e-5)
    full = resize_center_crop(open_image(path), verifier.img_size).astype(int)
    assert np.abs(full - store.batch([0])[0].numpy()).mean() < 1.0
    assert float(verifier.embed([open_image(path)])[0] @ eval_emb[0]) > 0.999
