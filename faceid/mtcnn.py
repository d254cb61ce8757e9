"""MTCNN with each stage batched over every photo of a call: facenet-pytorch's P-, R- and O-nets
(their weights ship inside its wheel) and its box helpers. With detect_face's overlaps (`nms`
0.7 and 0.7) it gives the same boxes, scores and landmarks as its `detect_face` (within 1e-4 px:
the nets' arithmetic differs slightly with the batch they run in), at less cost. Lower overlaps
drop more of the near-duplicate candidates around each face before the costlier nets see them.

What changes is how the pixels reach the nets. facenet-pytorch resizes the whole photo once per
pyramid level and cuts and resizes each candidate box separately (around 30 reach the R-net in a
154 px photo); here each photo's integral image is computed once, and every pyramid level and
every candidate crop is read off it with a few gathers. The area-averaging cells and the order of
the division are PyTorch's `interpolate(mode="area")`'s, so the nets see the same numbers, bit
for bit. The R- and O-nets then run once over the candidates of all the photos, whatever their
sizes, so a server's batch pays their fixed cost once.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image


def _nets(device: torch.device) -> list[torch.nn.Module]:
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

    # channels_last: on CPUs PyTorch's max pooling is about 10x faster in it, and the R- and O-nets
    # spend much of their time there (bench/README.md, align_cost)
    nets: tuple[torch.nn.Module, ...] = (_widened(PNet()), RNet(), ONet())
    return [net.to(device).to(memory_format=torch.channels_last).eval() for net in nets]


def _widened(pnet: Any) -> torch.nn.Module:
    """The P-net with 16 channels after its first convolution instead of 10: six more of zeros,
    which the second convolution gives zero weights, so it computes the same numbers (bit for bit
    on a CPU). In channels_last a CPU's PReLU and max pooling are vectorised over 16 channels, not
    over 10, and run several times faster (bench/README.md, align_cost)."""
    conv1, prelu1, conv2 = pnet.conv1, pnet.prelu1, pnet.conv2
    n, wide = conv1.out_channels, 16
    with torch.no_grad():
        w1 = torch.zeros((wide, *conv1.weight.shape[1:]))
        w1[:n] = conv1.weight
        b1 = torch.zeros(wide)
        b1[:n] = conv1.bias
        a1 = torch.zeros(wide)
        a1[:n] = prelu1.weight
        w2 = torch.zeros((conv2.out_channels, wide, *conv2.weight.shape[2:]))
        w2[:, :n] = conv2.weight
        pnet.conv1 = torch.nn.Conv2d(conv1.in_channels, wide, conv1.kernel_size)
        pnet.prelu1 = torch.nn.PReLU(wide)
        pnet.conv2 = torch.nn.Conv2d(wide, conv2.out_channels, conv2.kernel_size)
        for param, value in [
            (pnet.conv1.weight, w1),
            (pnet.conv1.bias, b1),
            (pnet.prelu1.weight, a1),
            (pnet.conv2.weight, w2),
            (pnet.conv2.bias, conv2.bias),
        ]:
            param.copy_(value)
    return pnet


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 127.5) * 0.0078125


def _integral(arr: np.ndarray) -> np.ndarray:
    """[B, H, W, 3] uint8 pixels -> [B, H + 1, W + 1, 3] sums of the pixels above and left (a zero
    first row and column): int32, which holds the sums of 8.4 million pixels (photos are shrunk for
    detection far below that), else int64. OpenCV's `integral` computes them: about 15x faster on
    a CPU core than NumPy's row-by-row sums, and the same integers."""
    import cv2

    b, h, w = arr.shape[:3]
    if 255 * h * w < 2**31:
        out = np.empty((b, h + 1, w + 1, 3), dtype=np.int32)
        for i in range(b):
            cv2.integral(arr[i], sum=out[i], sdepth=cv2.CV_32S)
        return out
    # float64 holds these sums exactly (below 2**53)
    return np.stack([cv2.integral(arr[i], sdepth=cv2.CV_64F).astype(np.int64) for i in range(b)])


def _cells(length: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's adaptive (area) pooling cells along one axis of `length` pixels pooled to `size`:
    cell i spans floor(i * length / size) to ceil((i + 1) * length / size)."""
    i = np.arange(size)
    return i * length // size, -(-(i + 1) * length // size)


def _shrunk(sums: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[B, h, w, 3] float32: the images of `sums` (their integral images) area-resized to `size`
    (h, w), equal to `interpolate(mode="area")`'s result (the same cells, their sums exact, then
    divided by the cell's height and width in that order) at a fraction of its cost."""
    b, rows, cols = sums.shape[:3]
    yl, yh = _cells(rows - 1, size[0])
    xl, xh = _cells(cols - 1, size[1])
    # each cell's four corners as rows of the flattened sums [B * rows * cols, 3], read with
    # np.take: fewer values read than whole rows then columns, and take is about 3x faster than
    # the same fancy indexing
    flat = sums.reshape(-1, 3)
    first = (np.arange(b) * rows * cols)[:, None, None]
    top, bottom = (first + yl[None, :, None] * cols), (first + yh[None, :, None] * cols)
    total = (flat.take(bottom + xh, axis=0) - flat.take(top + xh, axis=0)) - (
        flat.take(bottom + xl, axis=0) - flat.take(top + xl, axis=0)
    )
    return (
        total.astype(np.float32)
        / (yh - yl).astype(np.float32)[:, None, None]
        / (xh - xl).astype(np.float32)[None, :, None]
    )


def _bins(start: torch.Tensor, length: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, size] first and one-past-last pixel of each output cell along one axis: PyTorch's
    adaptive (area) pooling cells, floor(i * L / size) to ceil((i + 1) * L / size)."""
    i = torch.arange(size, device=start.device)
    lo = start[:, None] + torch.div(i * length[:, None], size, rounding_mode="floor")
    hi = start[:, None] + torch.div((i + 1) * length[:, None] + size - 1, size, rounding_mode="floor")
    return lo, hi


def _crops(sums: list[torch.Tensor], where: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """[N, 3, size, size] float: each box's part of its image, clamped to the image and area-resampled
    exactly as facenet-pytorch's detect_face does it (its pad() and interpolate(mode="area")), with
    each cell's mean read off the image's integral image (`sums[group]`) instead of a crop and a
    resize per box. `where` [N, 2] holds (group, index within the group) of each box's image."""
    out = torch.empty((len(boxes), size, size, 3), dtype=torch.float32, device=boxes.device)
    if not len(boxes):
        return out.permute(0, 3, 1, 2)
    g_of, i_of = where[:, 0], where[:, 1]
    b = boxes[:, :4].trunc().to(torch.int64)
    for g, s in enumerate(sums):
        sel = (g_of == g).nonzero().flatten()
        if not len(sel):
            continue
        h, w = s.shape[1] - 1, s.shape[2] - 1
        # pad(): 1-based inclusive corners clamped to the image, so 0-based columns x1 - 1 .. x2 - 1
        x1 = (b[sel, 0].clamp(min=1) - 1).clamp(max=w - 1)
        y1 = (b[sel, 1].clamp(min=1) - 1).clamp(max=h - 1)
        x2 = torch.maximum(b[sel, 2].clamp(max=w), x1 + 1)
        y2 = torch.maximum(b[sel, 3].clamp(max=h), y1 + 1)
        xl, xh = _bins(x1, x2 - x1, size)
        yl, yh = _bins(y1, y2 - y1, size)
        # the four corners of every cell as rows of the flattened sums [B * (h + 1) * (w + 1), 3],
        # read with one index_select (about twice as fast as four 3-d gathers)
        row = w + 1
        first = (i_of[sel] * (h + 1) * row)[:, None]
        top, bottom = first + yl * row, first + yh * row  # [n, size]
        corners = torch.stack(
            [
                bottom[:, :, None] + xh[:, None, :],
                top[:, :, None] + xh[:, None, :],
                bottom[:, :, None] + xl[:, None, :],
                top[:, :, None] + xl[:, None, :],
            ]
        )
        v = s.view(-1, 3).index_select(0, corners.view(-1)).view(4, len(sel), size, size, 3)
        total = (v[0] - v[1]) - (v[2] - v[3])
        # the cell's height, then its width, as PyTorch's pooling divides: bit-equal crops
        heights = (yh - yl)[:, :, None, None].to(torch.float32)
        widths = (xh - xl)[:, None, :, None].to(torch.float32)
        out[sel] = total.to(torch.float32) / heights / widths
    return out.permute(0, 3, 1, 2)


class BatchedMTCNN:
    """Finds faces and their five landmarks in RGB photos of any sizes, all stages batched."""

    def __init__(self, min_face: int, thresholds: Sequence[float], factor: float, device: Any = "cpu") -> None:
        self.device = torch.device(device)
        self.pnet, self.rnet, self.onet = _nets(self.device)
        self.min_face, self.thresholds, self.factor = min_face, list(thresholds), factor

    def _pnet(self, sums: np.ndarray, nms: float, base: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate boxes [N, 5] (x1, y1, x2, y2, score; squared) in same-size images, given as
        their integral images, and each box's image index. Of two candidates that overlap by more
        than `nms` (across the pyramid's levels), the weaker is dropped. `base`: the scale the
        images are searched at (the pyramid's levels are those of the images resized by it)."""
        from facenet_pytorch.models.utils.detect_face import generateBoundingBox, rerec
        from torchvision.ops import batched_nms

        h, w = sums.shape[1] - 1, sums.shape[2] - 1
        scale = 12.0 / self.min_face * base
        scales: list[float] = []
        side = min(h, w) * scale
        while side >= 12:  # the pyramid's scales, multiplied up as facenet-pytorch does
            scales.append(scale)
            scale *= self.factor
            side *= self.factor
        if not scales:
            # min_face is larger than the images' shorter side (a thumbnail, or a search for large
            # faces only in a small or a wide photo): one level at the largest face they can hold,
            # their shorter side, rather than no search at all
            scales.append(12.0 / min(h, w))
        found, where = [], []
        for i, scale in enumerate(scales):
            level = torch.from_numpy(_shrunk(sums, (int(h * scale + 1), int(w * scale + 1)))).to(self.device)
            # [B, h, w, 3] is channels_last's layout: the permuted view needs no copy
            reg, probs = self.pnet(_normalise(level.permute(0, 3, 1, 2)))
            boxes, inds = generateBoundingBox(reg, probs[:, 1], scale, self.thresholds[0])
            found.append(boxes)
            where.append(inds * len(scales) + i)  # one group per image and level
        boxes, groups = torch.cat(found), torch.cat(where)
        # within each level of each image (one call for all of them: groups never overlap), then
        # across the levels of each image
        keep = batched_nms(boxes[:, :4], boxes[:, 4], groups, 0.5)
        boxes, inds = boxes[keep], torch.div(groups[keep], len(scales), rounding_mode="floor")
        keep = batched_nms(boxes[:, :4], boxes[:, 4], inds, nms)
        boxes, inds = boxes[keep], inds[keep]
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        boxes = torch.stack(
            [
                boxes[:, 0] + boxes[:, 5] * bw,
                boxes[:, 1] + boxes[:, 6] * bh,
                boxes[:, 2] + boxes[:, 7] * bw,
                boxes[:, 3] + boxes[:, 8] * bh,
                boxes[:, 4],
            ],
            dim=1,
        )
        return rerec(boxes), inds

    @torch.inference_mode()
    def detect(
        self, images: Sequence[Image.Image], nms: Sequence[float] = (0.7, 0.7), max_side: int = 0
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image: boxes [K, 5] (x1, y1, x2, y2, score) and landmarks [K, 5, 2], in its pixels.
        `nms`: the overlaps above which the weaker of two candidates is dropped after the P-net
        and after the R-net (0.7 and 0.7 are detect_face's; lower ones send fewer on).
        `max_side`: an image with a longer side above it is searched as if shrunk to it (the
        pyramid's levels are read off its own pixels at those scales), and the R- and O-nets'
        crops come from its own pixels; 0 searches every image at its own size."""
        from facenet_pytorch.models.utils.detect_face import batched_nms_numpy, bbreg, rerec
        from torchvision.ops import batched_nms

        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(im.size, []).append(i)
        sums = []  # per group of same-size images: their integral images
        # each image's (group, index within the group), to find its integral image
        where = torch.zeros((len(images), 2), dtype=torch.int64)
        cand, cand_images = [], []  # candidate boxes and their images' indices, per group
        for g, ((w, h), idx) in enumerate(by_size.items()):
            where[idx, 0], where[idx, 1] = g, torch.arange(len(idx))
            arr = np.stack([np.asarray(images[i], dtype=np.uint8) for i in idx])
            integral = _integral(arr)
            sums.append(torch.from_numpy(integral).to(self.device))
            base = max_side / max(w, h) if 0 < max_side < max(w, h) else 1.0
            if min(w, h) * base < 12:  # below the P-net's window: nothing to find
                continue
            boxes, inds = self._pnet(integral, nms[0], base)
            cand.append(boxes)
            cand_images.append(torch.tensor(idx, device=self.device)[inds])
        empty = [(np.zeros((0, 5)), np.zeros((0, 5, 2))) for _ in images]
        if not cand or not sum(len(c) for c in cand):
            return empty
        boxes, img_ids = torch.cat(cand), torch.cat(cand_images)
        where = where.to(self.device)

        # R-net: refine and reject
        crops = _crops(sums, where[img_ids], boxes, 24)
        reg, score = self.rnet(_normalise(crops).contiguous(memory_format=torch.channels_last))
        score = score[:, 1]
        ok = score > self.thresholds[1]
        boxes = torch.cat([boxes[ok, :4], score[ok, None]], dim=1)
        reg, img_ids = reg[ok], img_ids[ok]
        keep = batched_nms(boxes[:, :4], boxes[:, 4], img_ids, nms[1])
        boxes, reg, img_ids = boxes[keep], reg[keep], img_ids[keep]
        boxes = rerec(bbreg(boxes, reg))
        if not len(boxes):
            return empty

        # O-net: landmarks and final boxes
        crops = _crops(sums, where[img_ids], boxes, 48)
        reg, points, score = self.onet(_normalise(crops).contiguous(memory_format=torch.channels_last))
        score = score[:, 1]
        ok = score > self.thresholds[2]
        boxes = torch.cat([boxes[ok, :4], score[ok, None]], dim=1)
        reg, points, img_ids = reg[ok], points[ok], img_ids[ok]
        bw = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        bh = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        px = bw * points[:, :5] + boxes[:, 0:1] - 1
        py = bh * points[:, 5:10] + boxes[:, 1:2] - 1
        points = torch.stack([px, py], dim=2)
        boxes = bbreg(boxes, reg)
        keep = batched_nms_numpy(boxes[:, :4], boxes[:, 4], img_ids, 0.7, "Min")
        boxes_np = boxes[keep].cpu().numpy().astype(np.float64)
        points_np = points[keep].cpu().numpy().astype(np.float64)
        ids = img_ids[keep].cpu().numpy()
        return [(boxes_np[ids == i], points_np[ids == i]) for i in range(len(images))]
