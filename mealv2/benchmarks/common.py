"""What the benchmarks share: generated inputs and random-init teachers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

DEFAULT_TEACHERS = ("resnet50", "efficientnet_b0")


def make_photo_dataset(root: Path, num_classes: int, per_class: int, seed: int = 0,
                       shape: tuple[int, int] | None = None) -> Path:
    """ImageNet-sized JPEGs (sides 250-500 px, or all ``shape`` (h, w); quality 90, textured like
    photos): what decoding costs."""
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        (root / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            h, w = shape or (int(rng.integers(250, 501)), int(rng.integers(300, 501)))
            yy, xx = np.mgrid[:h, :w] / max(h, w)
            img = np.empty((h, w, 3))
            for ch in range(3):
                a, b, f = rng.uniform(-1, 1, 3)
                img[..., ch] = 128 + 60 * np.sin(2 * np.pi * (a * yy + b * xx) * (1 + 4 * abs(f)) + ch)
            img += rng.normal(0, 18, img.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                root / f"class_{c:03d}" / f"img_{j:03d}.jpg", quality=90)
    return root


def random_teachers(archs, num_classes: int, folder: Path, res: int, *, first_seed: int = 0) -> list[str]:
    """Random-init checkpoints for timm architectures (no downloads), teacher i seeded ``first_seed + i``:
    speed, not accuracy (and the tests' teachers). Named by position, so an architecture may repeat."""
    specs = []
    for i, arch in enumerate(archs):
        torch.manual_seed(first_seed + i)
        path = folder / f"t{i}-{arch}.pth"
        torch.save(timm.create_model(arch, num_classes=num_classes).state_dict(), path)
        specs.append(f"{arch}={path}@{res}")
    return specs


def met(condition: bool) -> str:
    """A benchmark table's "met" cell."""
    return "yes" if condition else "**no**"
