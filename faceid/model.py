"""ResNet-50 trunk -> embedding, and the ArcFace margin head.

Shapes: images [B, 3, H, W] -> trunk features [B, 2048] (neck gap) or [B, 2048 * side^2] (neck
flat) -> embedding [B, D]. Embeddings are
L2-normalised where they are compared (cosine similarity), not inside the network, so the head can
use the raw vector.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from faceid.errors import ConfigError

log = logging.getLogger(__name__)

ARCH = "resnet50"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


NECKS = ("gap", "flat")


def trunk_grid(img_size: int) -> int:
    """Side of ResNet-50's last feature map for a square input: the stem and each of the three
    strided stages halve it, rounding up (64 px -> 2, 112 -> 4, 224 -> 7)."""
    side = img_size
    for _ in range(5):  # conv1 (stride 2), max-pool, layer2, layer3, layer4
        side = (side + 1) // 2
    return side


class EmbeddingNet(nn.Module):
    """`trunk` (ResNet-50 without its classifier) followed by `embed` (Linear + BatchNorm1d).

    The BatchNorm after the projection is the usual ArcFace "BN-FC-BN" neck: it keeps the
    embedding's scale stable, which matters once the head normalises it.

    `neck` says what the projection sees: "gap" the 2048 channels averaged over the last feature
    map (torchvision's pooling); "flat" the whole map flattened (2048 x side x side, side =
    `trunk_grid(img_size)`), which keeps where on the face a feature is, the "output E" of the
    ArcFace paper. `dropout` applies to that input during training (it has no weights, so
    checkpoints with and without it have the same keys).
    """

    def __init__(
        self,
        embedding_size: int = 512,
        trunk: Optional[nn.Module] = None,
        *,
        neck: str = "gap",
        img_size: int = 224,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if neck not in NECKS:
            raise ConfigError(f"neck={neck!r}: use one of {', '.join(NECKS)}")
        if trunk is None:
            trunk = resnet50_trunk()
        in_features = 2048
        if neck == "flat":
            trunk.avgpool = nn.Identity()  # torchvision's ResNet then flattens the whole map
            in_features = 2048 * trunk_grid(img_size) ** 2
        self.trunk = trunk
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.embed = nn.Sequential(
            nn.Linear(in_features, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        self.embedding_size = embedding_size
        self.neck = neck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, D] (not normalised)."""
        return self.embed(self.drop(self.trunk(x)))


def resnet50_trunk() -> nn.Module:
    """ResNet-50 without its classifier, untrained: [B, 3, H, W] -> [B, 2048] (the trunk of every
    EmbeddingNet, trained or loaded from a checkpoint)."""
    from torchvision.models import resnet50

    # zero_init_residual: each residual block starts as identity (Goyal et al. 2017, "Accurate,
    # Large Minibatch SGD"), which helps from-scratch training with small batches.
    net = resnet50(weights=None, zero_init_residual=True)
    net.fc = nn.Identity()
    return net


def build_model(
    *,
    embedding_size: int = 512,
    pretrained: bool = False,
    pretrained_weights: Optional[str] = None,
    neck: str = "gap",
    img_size: int = 224,
    dropout: float = 0.0,
) -> EmbeddingNet:
    """Build the embedding network; with `pretrained`, load ImageNet weights into the trunk from
    `pretrained_weights` or the local torch cache. Never downloads (raises ConfigError instead)."""
    model = EmbeddingNet(embedding_size, neck=neck, img_size=img_size, dropout=dropout)
    if pretrained or pretrained_weights:
        state = load_imagenet_weights(pretrained_weights)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            missing, unexpected = model.trunk.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches (another architecture) raise, even non-strict
            detail = " ".join(str(e).split())[:300]
            raise ConfigError(
                f"pretrained weights do not fit ResNet-50 ({detail}); give a torchvision resnet50 state dict"
            ) from None
        if missing or unexpected:
            raise ConfigError(
                f"pretrained weights do not fit ResNet-50: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}; give a torchvision resnet50 state dict"
            )
    return model


def imagenet_cache_path() -> Path:
    """Where torchvision keeps ResNet50_Weights.IMAGENET1K_V2 once downloaded."""
    from torchvision.models import ResNet50_Weights

    url = ResNet50_Weights.IMAGENET1K_V2.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_imagenet_weights(path: Optional[str]) -> dict[str, torch.Tensor]:
    candidates = [Path(path)] if path else [imagenet_cache_path()]
    if not path:
        # The V1 weights are equally usable as a trunk.
        from torchvision.models import ResNet50_Weights

        candidates.append(candidates[0].parent / os.path.basename(ResNet50_Weights.IMAGENET1K_V1.url))
    for p in candidates:
        if p.is_file():
            from faceid.checkpoint import load_torch_file

            # one line naming the file, never PyTorch's own advice (weights_only=False)
            state = load_torch_file(
                p,
                what="pretrained weights",
                noun="PyTorch state dict",
                expected="a torchvision resnet50 state-dict file",
                error=ConfigError,
            )
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise ConfigError(f"{p} is not a state dict; give a torchvision resnet50 state-dict file")
            log.info("loaded ImageNet weights from %s", p)
            return state
    if path:
        raise ConfigError(f"pretrained weights file not found: {path}; check the path given to --pretrained_weights")
    raise ConfigError(
        "--pretrained needs ImageNet ResNet-50 weights and none are on this machine (no download is "
        f"attempted): put resnet50 weights at {candidates[0]} (from a machine with internet: "
        "python -c 'import torchvision; torchvision.models.resnet50(weights=\"IMAGENET1K_V2\")') or "
        "pass --pretrained_weights FILE, or train from scratch without --pretrained"
    )


class ArcMarginProduct(nn.Module):
    """ArcFace head (Deng et al. 2019, "ArcFace: Additive Angular Margin Loss").

    logits[i, j] = s * cos(theta_ij + m) for the target class j = y_i, s * cos(theta_ij) otherwise,
    where cos(theta_ij) is the cosine between embedding i and class centre j.

    Where theta + m would pass pi the target logit would stop decreasing monotonically, so the
    usual fallback is used: cos(theta) - m * sin(m) beyond that point (or, with `easy_margin`, the
    margin is applied only where cos(theta) > 0).
    """

    def __init__(
        self, in_features: int, out_features: int, s: float = 64.0, m: float = 0.50, easy_margin: bool = False
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.s = s
        self.easy_margin = easy_margin
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.xavier_uniform_(self.weight)
        self.set_margin(m)

    def set_margin(self, m: float) -> None:
        """Change m (for a margin that grows over the first epochs)."""
        self.m = float(m)
        self.cos_m = math.cos(m)
        self.sin_m = math.sin(m)
        self.th = math.cos(math.pi - m)
        self.mm = math.sin(math.pi - m) * m

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in] -> [B, out] cosines with the class centres, in fp32."""
        return F.linear(F.normalize(x.float()), F.normalize(self.weight.float()))

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """x [B, in], label [B] int64 -> logits [B, out] (fp32)."""
        cosine = self.cosine(x)
        sine = torch.sqrt((1.0 - cosine * cosine).clamp(0.0, 1.0))
        phi = cosine * self.cos_m - sine * self.sin_m  # cos(theta + m)
        if self.easy_margin:
            phi = torch.where(cosine > 0, phi, cosine)
        else:
            phi = torch.where(cosine > self.th, phi, cosine - self.mm)
        one_hot = F.one_hot(label, self.out_features).to(cosine.dtype)
        return self.s * (one_hot * phi + (1.0 - one_hot) * cosine)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, s={self.s}, "
            f"m={self.m}, easy_margin={self.easy_margin}"
        )
