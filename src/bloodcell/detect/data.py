"""Training photographs for the FCOS trainer: each decoded and resized once, then augmented per (seed, epoch) and
served as batches of (images, targets) in torchvision's detection format.

Photographs and their boxes are read by bloodcell.data.fields (shared with the classifier's lab sets and the review
workstation's import); this module turns them into what the network trains on.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from bloodcell.data.fields import FieldAnnotation
from bloodcell.errors import DataError


def load_field_image(ann: FieldAnnotation) -> np.ndarray:
    """The photograph of a FieldAnnotation as H x W x 3 uint8 RGB."""
    try:
        with Image.open(ann.path) as im:
            return np.array(im.convert("RGB"))  # a writable copy
    except (OSError, ValueError) as exc:
        raise DataError(f"{ann.path}: cannot read the photograph ({exc})") from None


def resized_photo(image: np.ndarray, long_side: int) -> tuple[np.ndarray, float, float]:
    """`image` with its long side `long_side` (area-averaged), and the x and y scale factors applied."""
    h, w = image.shape[:2]
    scale = long_side / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    out = np.array(Image.fromarray(image).resize((nw, nh), Image.BILINEAR, reducing_gap=None))
    return out, nw / w, nh / h


def rot90_boxes(boxes: np.ndarray, k: int, width: int, height: int) -> np.ndarray:
    """Boxes of a W x H image after np.rot90(image, k) (k quarter turns counter-clockwise).

    Args:
        boxes: (N, 4) float (x0, y0, x1, y1) in pixels of the unturned image.
        k: quarter turns counter-clockwise, as np.rot90's k (taken modulo 4).
        width: the unturned image's width in pixels.
        height: the unturned image's height in pixels.
    """
    boxes = boxes.copy()
    for _ in range(k % 4):
        x0, y0, x1, y1 = boxes.T
        boxes = np.stack([y0, width - x1, y1, width - x0], axis=1).astype(np.float32)
        width, height = height, width
    return boxes


class FieldBatches(Dataset):
    """Photographs decoded and resized once; item = a list of positions -> (images, targets), augmented.

    Augmentation draws from a generator seeded by (seed, epoch, photo), so a resumed run sees what the
    uninterrupted one would have: flips, quarter turns, scale jitter and mild brightness/contrast/colour jitter.
    """

    def __init__(self, items: list, long_side: int, seed: int, augment: bool, scale_jitter: float = 0.2):
        self.images, self.boxes, self.labels = [], [], []
        for ann in items:
            image = load_field_image(ann)
            small, sx, sy = resized_photo(image, long_side)
            # the annotation's size, not the decoded one, is what its boxes are measured in
            fx, fy = small.shape[1] / ann.width, small.shape[0] / ann.height
            boxes = ann.boxes.astype(np.float32) * np.array([fx, fy, fx, fy], np.float32)
            self.images.append(small)
            self.boxes.append(boxes)
            self.labels.append(ann.labels.astype(np.int64))
        self.seed, self.augment, self.scale_jitter = seed, augment, scale_jitter
        self.sampler = None  # the EpochBatches feeding this set (its epoch seeds the augmentation)

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, i: int, epoch: int) -> tuple[torch.Tensor, dict]:
        image, boxes, labels = self.images[i], self.boxes[i], self.labels[i]
        if self.augment:
            rng = np.random.default_rng([self.seed, epoch, i, 17])
            h, w = image.shape[:2]
            if rng.random() < 0.5:
                image = image[:, ::-1]
                boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
            if rng.random() < 0.5:
                image = image[::-1]
                boxes = np.stack([boxes[:, 0], h - boxes[:, 3], boxes[:, 2], h - boxes[:, 1]], axis=1)
            k = int(rng.integers(4))
            image = np.rot90(image, k)
            boxes = rot90_boxes(boxes, k, w, h)
        x = torch.from_numpy(image.copy()).permute(2, 0, 1).float().div_(255.0)  # flips/turns are views
        b = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)).reshape(-1, 4)
        if self.augment:
            scale = float(np.exp(rng.uniform(-self.scale_jitter, self.scale_jitter)))
            if abs(scale - 1) > 1e-3:
                size = (max(32, round(x.shape[1] * scale)), max(32, round(x.shape[2] * scale)))
                b = b * torch.tensor([size[1] / x.shape[2], size[0] / x.shape[1]] * 2)
                x = torch.nn.functional.interpolate(
                    x[None], size=size, mode="bilinear", align_corners=False, antialias=scale < 1
                )[0]
            gain = torch.from_numpy(rng.uniform(0.93, 1.07, 3).astype(np.float32))[:, None, None]
            brightness, contrast = float(rng.uniform(0.85, 1.15)), float(rng.uniform(0.85, 1.15))
            mean = x.mean()
            x = ((x - mean) * contrast + mean) * brightness * gain
            x = x.clamp_(0, 1)
        lab = torch.from_numpy(labels) + 1
        keep = ((b[:, 2] - b[:, 0]) >= 1) & ((b[:, 3] - b[:, 1]) >= 1)
        return x, {"boxes": b[keep], "labels": lab[keep]}

    def __getitem__(self, positions):
        epoch = self.sampler.epoch if self.sampler is not None else 0
        pairs = [self.sample(int(i), epoch) for i in positions]
        return [p[0] for p in pairs], [p[1] for p in pairs]
