"""LabelConfig: everything `mealv2 label` does, refused here when it cannot run (not in click), so
Python callers meet the CLI's refusals."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..common.data.crops import CropParams
from ..common.data.loaders.registry import available_cores, resolve
from ..common.errors import MealV2Error, require_finite, require_in_range
from ..common.store.lease import writable_url
from ..common.store.objects import is_url
from ..common.store.writer import DEPTH

LABEL_RANGES = {**{name: (1, None, False) for name in ("rounds", "crops_per_image", "topk", "batch_size", "workers",
                                                       "shard_size")},
                "seed": (0, None, False), "temperature": (0, None, True)}


@dataclass
class LabelConfig:
    """Everything ``mealv2 label`` does; each field is the flag of the same name (``mealv2 label --help``),
    refused here when it cannot run, so Python callers meet the CLI's refusals.

    Args:
        data: images to label (ImageFolder, CSV or a folder of loose images); DATA.
        teachers: teacher specs (ARCH, ARCH=CKPT, CKPT with @RES, %NORM, *WEIGHT suffixes); --teachers.
        out: the store to create, resume or append rounds to; --out.
        rounds, crops_per_image, crop, topk, temperature, ...: as the flags of the same name
            (``crop`` holds --res/--scale/--ratio).

    Example::

        import mealv2
        store = mealv2.label(mealv2.LabelConfig("data/train", ["resnet50", "convnext_tiny"], "store", rounds=2))
    """

    data: str
    teachers: list[str]
    out: str
    rounds: int = 4
    crops_per_image: int = 4
    crop: CropParams = CropParams()
    topk: int = 10
    temperature: float = 1.0
    batch_size: int = 256
    seed: int = 0
    loader: str = "auto"
    device: str = "auto"
    workers: int = field(default_factory=available_cores)
    shard_size: int = 1024
    skip_bad: bool = False
    classes_file: str | None = None     # a state-dict teacher's class names in output order
    teacher_classes: dict[int, str] = field(default_factory=dict)  # teacher N's class names (--teacher-classes)
    teacher_check: bool = True
    teacher_precision: str = "fp32"
    dry_run: bool = False               # measure the teachers on a few batches, print what the run takes, write nothing
    progress: bool = True
    write_depth: int = DEPTH            # shards in flight on the background writer; 0 writes in the loop

    def __post_init__(self):
        resolve(self.loader)   # a backend that is not installed is refused before any work
        require_finite("label", temperature=self.temperature)
        require_in_range("label", LABEL_RANGES, **{name: getattr(self, name) for name in LABEL_RANGES})
        if not self.teachers:
            raise MealV2Error("label: no teachers given: pass --teachers SPEC (repeatable or comma separated)")
        if is_url(self.out):
            writable_url(self.out, MealV2Error)
