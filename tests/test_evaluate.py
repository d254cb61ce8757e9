"""Evaluation embeds each image once: a pairs file's images that --val holds too (the same files,
through links as well) reuse --val's embeddings, and the scores are those of embedding them apart."""

from __future__ import annotations

import os

import numpy as np
import pytest
from core_fixtures import SAMPLE_PAIRS, SAMPLE_TRAIN, SAMPLE_VAL, TINY, write_image

from faceid.config import TrainConfig
from faceid.evaluate import embed_store, same_files, score_protocol
from faceid.train import Trainer


def test_same_files_follows_symbolic_and_hard_links(tmp_path):
    a, b = write_image(tmp_path / "a.png", seed=1), write_image(tmp_path / "b.png", seed=2)
    (tmp_path / "sym.png").symlink_to(a)
    os.link(b, tmp_path / "hard.png")
    c = write_image(tmp_path / "c.png", seed=1)  # the same pixels, another file: not the same
    got = same_files([tmp_path / "sym.png", tmp_path / "hard.png", c, tmp_path / "missing.png", a], [a, b])
    assert got.tolist() == [0, 1, -1, -1, 0]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    cfg = TrainConfig(
        train=str(SAMPLE_TRAIN),
        val=str(SAMPLE_VAL),
        pairs_file=str(SAMPLE_PAIRS),
        ckpt_dir=str(tmp_path_factory.mktemp("ck")),
        train_mode="arcface",
        epochs=1,
        eval_flip=True,
        **TINY,
    )
    t = Trainer(cfg)
    t.setup()
    return t


def test_pairs_file_images_held_by_val_are_embedded_once(trainer, monkeypatch):
    store, ia, ib, labels, folds = trainer.protocol
    # The sample's pairs file names --val's own images: every one is found there.
    assert (trainer._protocol_in_val >= 0).all() and len(trainer._protocol_in_val) == len(store.folder)
    calls: list[int] = []
    real = embed_store

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(len(out))
        return out

    monkeypatch.setattr("faceid.trainer.embed_store", counting)
    metrics = trainer.evaluate()
    assert calls == [len(trainer.val_folder)]  # --val once; nothing embedded again for the pairs

    # The same scores as embedding the pairs file's images on their own.
    apart = real(trainer.model, store, trainer.eval_tf, batch_size=64, amp_dtype=trainer.amp_dtype, flip=True)
    expected = score_protocol(apart, ia, ib, labels, folds)
    for k, v in expected.items():
        assert metrics[k] == pytest.approx(v, abs=1e-3), k


def test_pairs_file_images_outside_val_are_embedded_in_the_given_order(trainer):
    store = trainer.protocol[0]
    some = np.array([3, 0, 2])
    together = embed_store(trainer.model, store, trainer.eval_tf, batch_size=2, amp_dtype=None, flip=True)
    picked = embed_store(trainer.model, store, trainer.eval_tf, batch_size=2, amp_dtype=None, flip=True, indices=some)
    np.testing.assert_allclose(picked, together[some], atol=1e-5)
