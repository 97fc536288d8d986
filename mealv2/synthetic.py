"""A small real image dataset made on the spot: procedural shapes and textures in clutter.

``mealv2 demo`` needs an ImageFolder dataset that a tiny network can learn in a minute on
a CPU, yet that is not trivially separable: the class is a *shape or texture* (disc, ring,
square, triangle, cross, star, horizontal stripes, vertical stripes, checkerboard, dots),
drawn in a random colour over a random two-colour gradient background, at a random place,
size and angle, among distractor blobs and lines of random colours, with pixel noise and
JPEG compression. Colour carries no information about the class: every colour is drawn
from the same distribution for every class. By default half of the images also hold a
smaller object of another class, and the label names the larger one, as a photo's label
names its main subject. Random-resized crops often miss the object, cut it or show only
the other one: the one-hot label is then wrong for what the crop shows, and a teacher
ensemble's soft label for that crop is not (FKD's region-level labels).

Everything is a pure function of the seed: image ``j`` of class ``c`` in split ``s`` is
drawn from ``numpy.random.default_rng([seed, s, c, j])``, so the same seed gives the same
files byte for byte, in any order, on any machine (same Pillow/libjpeg).

Shapes are rendered from signed distance functions with a one-pixel soft edge, so drawing
is a handful of vectorised numpy expressions per image.
"""
from __future__ import annotations

import colorsys
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("disc", "ring", "square", "triangle", "cross", "star",
           "hstripes", "vstripes", "checker", "dots")
SPLITS = ("train", "val")
MANIFEST = "synthetic.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SyntheticConfig:
    """What defines the dataset; written to ``OUT/synthetic.json`` so a rerun can reuse it."""

    seed: int = 0
    train_per_class: int = 100
    val_per_class: int = 40
    num_classes: int = len(CLASSES)
    min_side: int = 64            # each of H and W is drawn in [min_side, max_side]
    max_side: int = 144
    noise: tuple[float, float] = (3.0, 12.0)   # range of the Gaussian pixel-noise sigma
    clutter: tuple[int, int] = (2, 6)          # range of the number of distractors
    quality: tuple[int, int] = (70, 95)        # range of the JPEG quality
    second: float = 0.5                        # probability of a smaller object of another class

    def __post_init__(self):
        if not 2 <= self.num_classes <= len(CLASSES):
            raise ValueError(f"num_classes must be in [2, {len(CLASSES)}], got {self.num_classes}")
        if not 16 <= self.min_side <= self.max_side:
            raise ValueError(f"need 16 <= min_side <= max_side, got {self.min_side}, {self.max_side}")
        if self.train_per_class < 1 or self.val_per_class < 1:
            raise ValueError("need at least one train and one val image per class")

    @property
    def classes(self) -> tuple[str, ...]:
        return CLASSES[:self.num_classes]

    def to_json(self) -> dict:
        d = asdict(self)
        d["format_version"] = FORMAT_VERSION
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# --------------------------------------------------------------------------- drawing helpers

def _coverage(sdf: np.ndarray) -> np.ndarray:
    """Signed distance (pixels, negative inside) -> coverage in [0, 1] with a 1 px soft edge."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _rotate(y: np.ndarray, x: np.ndarray, theta: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(theta), np.sin(theta)
    return c * y - s * x, s * y + c * x


def _box(u: np.ndarray, v: np.ndarray, hu: float, hv: float) -> np.ndarray:
    """Exact SDF of an axis-aligned box with half sides (hu, hv)."""
    du, dv = np.abs(u) - hu, np.abs(v) - hv
    outside = np.hypot(np.maximum(du, 0), np.maximum(dv, 0))
    return outside + np.minimum(np.maximum(du, dv), 0)


def _polygon(u: np.ndarray, v: np.ndarray, n: int, r: float) -> np.ndarray:
    """Distance to a regular n-gon of circumradius r (exact inside, a close bound outside)."""
    sector = 2 * np.pi / n
    a = (np.arctan2(u, v) % sector) - sector / 2          # angle from the nearest edge normal
    return np.hypot(u, v) * np.cos(a) - r * np.cos(np.pi / n)


def _star(u: np.ndarray, v: np.ndarray, r: float, points: int = 5, inner: float = 0.45) -> np.ndarray:
    """Approximate SDF of a star: radius modulated between inner*r and r by the angle."""
    angle = np.arctan2(u, v)
    sector = 2 * np.pi / points
    a = np.abs((angle % sector) - sector / 2) / (sector / 2)   # 0 at a tip's opposite, 1 at tips
    radius = r * (inner + (1 - inner) * a ** 1.5)
    return (np.hypot(u, v) - radius) * 0.7


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    h, s, v = rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.15, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255


def _contrasting(rng: np.random.Generator, against: np.ndarray, min_dist: float = 110.0) -> np.ndarray:
    """A random colour at least ``min_dist`` (RGB distance) from ``against`` (a few tries)."""
    for _ in range(20):
        c = _random_colour(rng)
        if np.linalg.norm(c - against) >= min_dist:
            return c
    return 255.0 - against


def _class_sdf(name: str, y: np.ndarray, x: np.ndarray, r: float, theta: float,
               rng: np.random.Generator) -> np.ndarray:
    """Signed distance of the class object centred at the origin; textures fill a patch."""
    u, v = _rotate(y, x, theta)
    if name == "disc":
        return np.hypot(y, x) - r
    if name == "ring":
        width = r * rng.uniform(0.15, 0.3)
        return np.abs(np.hypot(y, x) - (r - width)) - width
    if name == "square":
        return _box(u, v, 0.8 * r, 0.8 * r)
    if name == "triangle":
        return _polygon(u, v, 3, 1.15 * r)
    if name == "cross":
        t = r * rng.uniform(0.22, 0.34)
        return np.minimum(_box(u, v, r, t), _box(u, v, t, r))
    if name == "star":
        return _star(u, v, 1.15 * r)
    # textures: a rectangular patch (random aspect) filled with a periodic pattern
    hu, hv = r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2)
    period = max(4.0, r * rng.uniform(0.3, 0.5))
    jitter = rng.uniform(-0.2, 0.2)      # stripes stay near their axis: the class is the axis
    if name in ("hstripes", "vstripes"):
        a, b = _rotate(y, x, jitter)
        patch = _box(a, b, hu, hv)
        coord = a if name == "hstripes" else b
        pattern = (np.abs(((coord / period) % 1.0) - 0.5) - 0.25) * period   # SDF of the bands
        return np.maximum(patch, pattern)
    if name == "checker":
        patch = _box(u, v, hu, hv)
        cu = np.abs(((u / period) % 1.0) - 0.5) - 0.25
        cv = np.abs(((v / period) % 1.0) - 0.5) - 0.25
        pattern = -np.sign(cu * cv) * np.minimum(np.abs(cu), np.abs(cv)) * period
        return np.maximum(patch, pattern)
    if name == "dots":
        patch = _box(u, v, hu, hv)
        du = ((u / period) % 1.0) - 0.5
        dv = ((v / period) % 1.0) - 0.5
        pattern = (np.hypot(du, dv) - 0.28) * period
        return np.maximum(patch, pattern)
    raise ValueError(f"unknown class {name!r}")


def _paint(img: np.ndarray, cover: np.ndarray, colour: np.ndarray) -> None:
    a = cover[..., None]
    img *= 1 - a
    img += a * colour


def _distractor(img: np.ndarray, y: np.ndarray, x: np.ndarray, h: int, w: int, scale: float,
                rng: np.random.Generator) -> None:
    """An elongated blob or a thin line segment, smaller than the object, in a random colour."""
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    theta = rng.uniform(0, np.pi)
    u, v = _rotate(y - cy, x - cx, theta)
    if rng.random() < 0.5:   # elongated ellipse (never round, so never a small disc)
        a = scale * rng.uniform(0.15, 0.35)
        b = a * rng.uniform(0.25, 0.55)
        sdf = (np.hypot(u / a, v / b) - 1) * b
    else:                    # line segment
        half = scale * rng.uniform(0.3, 0.9)
        sdf = _box(u, v, rng.uniform(0.5, 1.5), half)
    _paint(img, _coverage(sdf), _random_colour(rng))


def render(name: str, h: int, w: int, rng: np.random.Generator, clutter: tuple[int, int] = (2, 6),
           noise: tuple[float, float] = (3.0, 12.0), second: float = 0.0,
           classes: tuple[str, ...] = CLASSES) -> np.ndarray:
    """One (h, w, 3) uint8 image of class ``name``, drawn from ``rng``.

    With probability ``second`` a smaller object of another class of ``classes`` is drawn
    too, away from the main one: the label is the larger object, as in a photo with a main
    subject, and a random crop may show only the other one.
    """
    y, x = np.mgrid[:h, :w].astype(np.float32) + 0.5
    # background: a linear gradient between two random colours in a random direction
    c0, c1 = _random_colour(rng), _random_colour(rng)
    phi = rng.uniform(0, 2 * np.pi)
    t = (np.cos(phi) * y / h + np.sin(phi) * x / w)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = (c0 + (c1 - c0) * t[..., None]).astype(np.float32)

    side = min(h, w)
    r = side * rng.uniform(0.24, 0.38)                  # object "radius"
    centre = lambda radius: (rng.uniform(radius, h - radius) if h > 2 * radius else h / 2,
                             rng.uniform(radius, w - radius) if w > 2 * radius else w / 2)
    cy, cx = centre(r)
    theta = rng.uniform(0, 2 * np.pi)
    n_clutter = int(rng.integers(clutter[0], clutter[1] + 1))
    behind = int(rng.integers(0, n_clutter + 1))        # some distractors drawn over the object
    for _ in range(behind):
        _distractor(img, y, x, h, w, r, rng)
    if rng.random() < second:
        other = [c for c in classes if c != name]
        name2 = other[int(rng.integers(len(other)))]
        r2 = r * rng.uniform(0.45, 0.7)
        spots = [centre(r2) for _ in range(6)]          # the spot farthest from the main object
        cy2, cx2 = max(spots, key=lambda p: (p[0] - cy) ** 2 + (p[1] - cx) ** 2)
        colour2 = _contrasting(rng, (c0 + c1) / 2)
        _paint(img, _coverage(_class_sdf(name2, y - cy2, x - cx2, r2, rng.uniform(0, 2 * np.pi), rng)), colour2)
    colour = _contrasting(rng, (c0 + c1) / 2)
    _paint(img, _coverage(_class_sdf(name, y - cy, x - cx, r, theta, rng)), colour)
    for _ in range(n_clutter - behind):
        _distractor(img, y, x, h, w, r * 0.7, rng)
    img += rng.normal(0, rng.uniform(*noise), img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- the dataset

def image_rng(seed: int, split: str, class_id: int, j: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), class_id, j])


def make_image(cfg: SyntheticConfig, split: str, class_id: int, j: int) -> tuple[np.ndarray, int]:
    """Pixels and JPEG quality of image ``j`` of ``class_id`` in ``split``: pure in its arguments."""
    rng = image_rng(cfg.seed, split, class_id, j)
    h, w = (int(v) for v in rng.integers(cfg.min_side, cfg.max_side + 1, size=2))
    quality = int(rng.integers(cfg.quality[0], cfg.quality[1] + 1))
    return render(cfg.classes[class_id], h, w, rng, cfg.clutter, cfg.noise, cfg.second, cfg.classes), quality


def generate(out: str | Path, cfg: SyntheticConfig = SyntheticConfig()) -> dict[str, Path]:
    """Write ``out/{train,val}/<class>/<class>_<j>.jpg`` and ``out/synthetic.json``.

    If ``out/synthetic.json`` already describes ``cfg`` and every file is there, nothing is
    rewritten. Returns ``{"train": path, "val": path}``.
    """
    out = Path(out)
    manifest = out / MANIFEST
    counts = {"train": cfg.train_per_class, "val": cfg.val_per_class}
    paths = {split: out / split for split in SPLITS}
    expected = [paths[s] / name / f"{name}_{j:04d}.jpg"
                for s in SPLITS for name in cfg.classes for j in range(counts[s])]
    if manifest.is_file() and json.loads(manifest.read_text()) == cfg.to_json() \
            and all(p.is_file() for p in expected):
        return paths
    if manifest.exists():
        manifest.unlink()
    for split in SPLITS:
        for c, name in enumerate(cfg.classes):
            d = paths[split] / name
            d.mkdir(parents=True, exist_ok=True)
            for stale in d.glob("*.jpg"):   # a previous, different config
                stale.unlink()
            for j in range(counts[split]):
                pixels, quality = make_image(cfg, split, c, j)
                Image.fromarray(pixels).save(d / f"{name}_{j:04d}.jpg", quality=quality)
    manifest.write_text(json.dumps(cfg.to_json(), indent=2) + "\n")   # last: marks completion
    return paths
