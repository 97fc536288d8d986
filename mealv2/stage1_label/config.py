"""LabelConfig: everything `mealv2 label` does, refused here when it cannot run (not in click), so
Python callers meet the CLI's refusals."""
from __future__ import annotations

from dataclasses import Field, dataclass

from ..common.config import (CLASS_FILES, COUNT, DEVICE, FLAG, FLOAT_ABOVE_0, INT_FROM_0, SPECS, TEXT, Choice,
                             OrNone, Setting, check_settings, declared, fill_unset, given, setting, store_setting)
from ..common.data.crops import CROP_FLAGS, CropParams
from ..common.data.loaders.registry import LOADER_CHOICES, available_cores, resolve
from ..common.errors import MealV2Error
from ..common.models.runtime import PRECISIONS
from ..common.store.locations import LOCAL_PATH, StorePath
from ..common.store.writer import DEPTH


def _store_flag(kind: Setting, fresh) -> Field:
    """A setting the store records: unset (None) it is the store's with --add-teacher (a value given must equal
    it: add_teacher.store_settings), ``fresh`` otherwise (filled in at construction)."""
    return store_setting(kind, "add_teacher", fresh, fills=True)


@dataclass
class LabelConfig:
    """Everything ``mealv2 label`` does; each field is the flag of the same name (``mealv2 label --help``),
    refused here when it cannot run, so Python callers meet the CLI's refusals.

    Args:
        data: images to label (ImageFolder, CSV or a folder of loose images); DATA.
        teachers: teacher specs (ARCH, ARCH=CKPT, CKPT with @RES, %NORM, *WEIGHT suffixes); --teachers.
        add_teacher: one more teacher spec (the same form) to run over the finished store ``out``'s own crops and
            add as a per-teacher layer, instead of labelling with ``teachers``; --add-teacher.
        out: the store to create, resume or append rounds to; --out.
        rounds, crops_per_image, res, scale, ratio, topk, temperature, seed, shard_size: what the store records;
            None (unset): the store's with ``add_teacher`` (a value given must equal it), else 4, 4, 224,
            RandomResizedCrop's scale and ratio, 10, 1, 0, 1024 (filled in at construction); --rounds, ...
        batch_size, loader, ...: as the flags of the same name.

    Example::

        import mealv2
        store = mealv2.label(mealv2.LabelConfig("data/train", ["resnet50", "convnext_tiny"], "store", rounds=2))
    """

    data: str = setting(LOCAL_PATH)
    teachers: list[str] = setting(SPECS)
    out: str = setting(StorePath(write=True))
    rounds: int | None = _store_flag(COUNT, 4)
    crops_per_image: int | None = _store_flag(COUNT, 4)
    res: int | None = _store_flag(declared(CropParams, "res"), CropParams.res)
    scale: tuple[float, float] | None = _store_flag(declared(CropParams, "scale"), CropParams.scale)
    ratio: tuple[float, float] | None = _store_flag(declared(CropParams, "ratio"), CropParams.ratio)
    topk: int | None = _store_flag(COUNT, 10)
    temperature: float | None = _store_flag(FLOAT_ABOVE_0, 1.0)
    batch_size: int = setting(COUNT, 256)
    seed: int | None = _store_flag(INT_FROM_0, 0)
    loader: str = setting(Choice(LOADER_CHOICES), "auto")
    device: str = setting(DEVICE, "auto")
    workers: int = setting(COUNT, factory=available_cores)
    shard_size: int | None = _store_flag(COUNT, 1024)
    skip_bad: bool = setting(FLAG, False)
    classes_file: str | None = setting(OrNone(LOCAL_PATH), None)   # a state-dict teacher's class names in output order
    teacher_classes: dict[int, str] = setting(CLASS_FILES, factory=dict)  # teacher N's class names (--teacher-classes)
    teacher_check: bool = setting(FLAG, True)
    teacher_precision: str = setting(Choice(PRECISIONS), "fp32")
    keep_teachers: bool = setting(FLAG, False)   # also store each teacher's own top-k (per-teacher layers)
    add_teacher: str | None = setting(OrNone(TEXT), None)   # run only this teacher over a finished store's crops, add its layer
    dry_run: bool = setting(FLAG, False)   # measure the teachers on a few batches, print what the run takes, write nothing
    progress: bool = setting(FLAG, True)
    write_depth: int = setting(INT_FROM_0, DEPTH)   # shards in flight on the background writer; 0 writes in the loop

    def __post_init__(self):
        check_settings("label", self)
        fill_unset(self)   # without --add-teacher; with it, store_settings gives the store's
        CropParams(**given(self, CROP_FLAGS))   # refuses a scale or ratio out of order or bounds, naming it
        resolve(self.loader)   # a backend that is not installed is refused before any work
        if self.add_teacher is not None and self.teachers:
            raise MealV2Error(f"label --add-teacher {self.add_teacher}: also given --teachers "
                              f"{','.join(self.teachers)}; --add-teacher runs only the new teacher over the store's "
                              f"crops (the store records its ensemble): drop --teachers")
        if self.add_teacher is not None and "," in self.add_teacher:
            raise MealV2Error(f"label --add-teacher {self.add_teacher}: a run adds one teacher's layer, this names "
                              f"{len(self.add_teacher.split(','))} (a comma list is --teachers'); run `mealv2 label "
                              f"--add-teacher SPEC` once per teacher")
        if self.add_teacher is not None and (unused := [flag for flag, on in (("--keep-teachers", self.keep_teachers),
                                                                              ("--dry-run", self.dry_run)) if on]):
            raise MealV2Error(f"label --add-teacher {self.add_teacher}: {' and '.join(unused)} "
                              f"{'does' if len(unused) == 1 else 'do'} not apply (it adds one teacher's layer): "
                              f"drop {'it' if len(unused) == 1 else 'them'}")
        if not self.teachers and self.add_teacher is None:
            raise MealV2Error("label: no teachers given: pass --teachers SPEC (repeatable or comma separated), or "
                              "--add-teacher SPEC to add a teacher's layer to a finished store")

    @property
    def crop(self) -> CropParams:
        """The crops: --res, --scale and --ratio (with --add-teacher, the store's once store_settings gave them)."""
        return CropParams(**given(self, CROP_FLAGS))
