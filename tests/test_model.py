"""faceid.model: the ArcFace head's logits against the formula, and the pretrained-trunk loading."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from faceid.errors import ConfigError
from faceid.model import ArcMarginProduct, EmbeddingNet, build_model

S, M = 30.0, 0.5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one compute thread is faster than two that wait on each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _head_with_angles(
    angles: list[float], *, s: float = S, m: float = M, easy_margin: bool = False, n_classes: int = 3
):
    """A head whose class centres are the unit axes, and inputs at `angles` from centre 0 (in the
    plane of axes 0 and 1). Returns (head, x [B, n_classes], labels [B] = 0)."""
    head = ArcMarginProduct(n_classes, n_classes, s=s, m=m, easy_margin=easy_margin)
    with torch.no_grad():
        head.weight.copy_(torch.eye(n_classes) * 2.0)  # scale must not matter (normalised)
    x = torch.zeros(len(angles), n_classes)
    for i, a in enumerate(angles):
        x[i, 0], x[i, 1] = 3.0 * math.cos(a), 3.0 * math.sin(a)
    return head, x, torch.zeros(len(angles), dtype=torch.long)


def _theta(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Angles [B, C] between normalised rows of x and of w, in float64."""
    cos = F.normalize(x.double(), dim=1) @ F.normalize(w.double(), dim=1).T
    return torch.acos(cos.clamp(-1.0, 1.0))


def test_target_logit_is_s_cos_theta_plus_m_on_random_inputs():
    torch.manual_seed(0)
    head = ArcMarginProduct(16, 10, s=S, m=M)
    x = torch.randn(32, 16)
    y = torch.randint(0, 10, (32,))
    logits = head(x, y).double()
    theta = _theta(x, head.weight.detach())
    rows = torch.arange(32)
    t = theta[rows, y]
    normal = t + M < math.pi
    assert normal.all(), "random 16-d inputs should not reach the fallback region"
    torch.testing.assert_close(logits[rows, y], S * torch.cos(t + M), rtol=1e-5, atol=1e-4)
    # every other logit is the plain scaled cosine
    mask = torch.ones_like(logits, dtype=torch.bool)
    mask[rows, y] = False
    torch.testing.assert_close(logits[mask], (S * torch.cos(theta))[mask], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("angle", [0.0, 0.3, 1.2, 2.0, math.pi - M - 0.05])
def test_target_logit_normal_branch_at_known_angles(angle):
    head, x, y = _head_with_angles([angle])
    logits = head(x, y)
    assert logits[0, 0].item() == pytest.approx(S * math.cos(angle + M), abs=1e-3)
    # non-target classes: axis 1 is at pi/2 - angle, axis 2 is orthogonal
    assert logits[0, 1].item() == pytest.approx(S * math.sin(angle), abs=1e-3)
    assert logits[0, 2].item() == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("angle", [math.pi - M + 0.05, 2.9, math.pi - 0.01])
def test_target_logit_fallback_when_theta_plus_m_passes_pi(angle):
    assert angle + M > math.pi
    head, x, y = _head_with_angles([angle])
    logits = head(x, y)
    mm = math.sin(math.pi - M) * M  # = m * sin(m), the usual ArcFace fallback
    assert logits[0, 0].item() == pytest.approx(S * (math.cos(angle) - mm), abs=1e-3)
    # and it is not s*cos(theta+m), which would start rising again past pi
    assert logits[0, 0].item() != pytest.approx(S * math.cos(angle + M), abs=1e-2)


def test_target_logit_decreases_monotonically_with_theta():
    angles = [i * math.pi / 200 for i in range(1, 200)]
    head, x, y = _head_with_angles(angles)
    target = head(x, y)[:, 0]
    assert (target[1:] < target[:-1]).all()


@pytest.mark.parametrize("angle,expect_margin", [(0.4, True), (1.5, True), (1.7, False), (2.9, False)])
def test_easy_margin_applies_m_only_where_cos_is_positive(angle, expect_margin):
    head, x, y = _head_with_angles([angle], easy_margin=True)
    got = head(x, y)[0, 0].item()
    want = S * (math.cos(angle + M) if expect_margin else math.cos(angle))
    assert math.cos(angle) > 0 if expect_margin else math.cos(angle) <= 0
    assert got == pytest.approx(want, abs=1e-3)


def test_set_margin_zero_gives_plain_normalised_softmax_logits():
    torch.manual_seed(1)
    head = ArcMarginProduct(8, 5, s=S, m=M)
    x = torch.randn(12, 8)
    y = torch.randint(0, 5, (12,))
    head.set_margin(0.0)
    plain = S * F.linear(F.normalize(x), F.normalize(head.weight.detach()))
    torch.testing.assert_close(head(x, y), plain, rtol=1e-5, atol=1e-4)
    # and back: the margin is a live setting, not baked in at construction
    head.set_margin(M)
    rows = torch.arange(12)
    assert (head(x, y)[rows, y] < plain[rows, y] + 1e-4).all()
    assert head.m == M


def test_head_logits_are_fp32_with_shape_and_keep_the_signature():
    head = ArcMarginProduct(in_features=6, out_features=4, s=64.0, m=0.5, easy_margin=False)
    out = head(torch.randn(3, 6, dtype=torch.bfloat16), torch.tensor([0, 1, 3]))
    assert out.shape == (3, 4) and out.dtype == torch.float32
    assert "easy_margin=False" in repr(head)


# --- pretrained trunk ---------------------------------------------------------------------------


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """An empty torch cache, and any download attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_download(*a, **k):
        raise AssertionError("build_model must never download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "torch_home"


def test_pretrained_without_weights_says_how_to_provide_them(empty_torch_home):
    with pytest.raises(ConfigError) as ei:
        build_model(embedding_size=16, pretrained=True)
    msg = str(ei.value)
    assert "--pretrained_weights" in msg
    assert str(empty_torch_home) in msg  # where to put the cached file
    assert "\n" not in msg


def test_pretrained_weights_file_loads_into_the_trunk(tmp_path, empty_torch_home):
    from torchvision.models import resnet50

    torch.manual_seed(3)
    state = resnet50().state_dict()
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    model = build_model(embedding_size=16, pretrained_weights=str(path))
    assert isinstance(model, EmbeddingNet)
    trunk = model.trunk.state_dict()
    expected = {k: v for k, v in state.items() if not k.startswith("fc.")}
    assert set(trunk) == set(expected)
    for k, v in expected.items():
        assert torch.equal(trunk[k], v), k
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 16)


def test_garbage_weights_file_is_a_config_error(tmp_path):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"\x00garbage, not a torch file" * 10)
    with pytest.raises(ConfigError) as ei:
        build_model(embedding_size=16, pretrained_weights=str(bad))
    assert str(bad) in str(ei.value) and "resnet50" in str(ei.value)


def test_missing_weights_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found.*--pretrained_weights"):
        build_model(embedding_size=16, pretrained_weights=str(tmp_path / "nope.pth"))


def test_weights_of_another_architecture_are_a_config_error(tmp_path):
    from torchvision.models import resnet18

    path = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), path)
    with pytest.raises(ConfigError, match="do not fit ResNet-50"):
        build_model(embedding_size=16, pretrained_weights=str(path))


def test_a_non_state_dict_is_a_config_error(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ConfigError, match="not a state dict"):
        build_model(embedding_size=16, pretrained_weights=str(path))


# --- the neck: what the embedding layer sees -------------------------------------------------------


@pytest.mark.parametrize("img_size,side", [(32, 1), (64, 2), (96, 3), (112, 4), (224, 7)])
def test_flat_neck_sees_the_whole_last_feature_map(img_size, side):
    from faceid.model import trunk_grid

    assert trunk_grid(img_size) == side
    net = build_model(embedding_size=8, neck="flat", img_size=img_size).eval()
    assert net.embed[0].in_features == 2048 * side * side
    with torch.no_grad():
        assert net.trunk(torch.zeros(1, 3, img_size, img_size)).shape == (1, 2048 * side * side)
        assert net(torch.zeros(2, 3, img_size, img_size)).shape == (2, 8)


def test_flat_neck_keeps_where_a_feature_is_and_gap_does_not():
    """Swapping the left and right halves of the last feature map changes a flat embedding; an
    average over the map cannot see it."""
    torch.manual_seed(0)
    feat = torch.rand(1, 2048, 2, 2)
    swapped = feat.flip(3)
    for neck, differs in (("flat", True), ("gap", False)):
        net = build_model(embedding_size=8, neck=neck, img_size=64).eval()
        head = net.trunk.avgpool
        with torch.no_grad():
            a, b = (net.embed(net.drop(torch.flatten(head(f), 1))) for f in (feat, swapped))
        assert (not torch.allclose(a, b, atol=1e-5)) == differs, neck


def test_dropout_acts_in_training_only_and_adds_no_weights():
    torch.manual_seed(0)
    plain = build_model(embedding_size=8, neck="flat", img_size=32)
    dropped = build_model(embedding_size=8, neck="flat", img_size=32, dropout=0.5)
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    dropped.load_state_dict(plain.state_dict())
    x = torch.rand(4, 3, 32, 32)
    plain.eval()
    dropped.eval()
    with torch.no_grad():
        torch.testing.assert_close(dropped(x), plain(x))
        feats = dropped.trunk(x)
        dropped.train()
        live = feats != 0  # the trunk ends in a ReLU
        zeroed = (dropped.drop(feats)[live] == 0).float().mean().item()
    assert live.sum() > 1000 and 0.4 < zeroed < 0.6


def test_unknown_neck_is_a_config_error():
    with pytest.raises(ConfigError, match="gap, flat"):
        EmbeddingNet(8, neck="mean")
