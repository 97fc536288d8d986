"""TrainConfig: everything `mealv2 train` does, and the refusals of a config that cannot run.

The rules live here, not in click, so Python callers meet every refusal of the CLI; `commands.py` only
builds a TrainConfig from the flags.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..common.config import (CLASS_FILES, COUNT, DEVICE, FLAG, FLOAT_ABOVE_0, FLOAT_FROM_0, INT_FROM_0, SPECS, TEXT,
                             Choice, Number, OrNone, Weights, check_settings, declared, field_defaults, flag_name,
                             given, setting, store_setting, word)
from ..common.data.crops import CROP_FLAGS, CropParams
from ..common.data.loaders.registry import LOADER_CHOICES, available_cores, resolve
from ..common.errors import MealV2Error
from ..common.models.runtime import PRECISIONS
from ..common.store.locations import LOCAL_PATH, StorePath

FRESH_CROPS_PER_IMAGE = 4   # without --labels, when not given (FKD's num_crops)
# Settings a resumed run may change: where things are and how the run is executed, not what it
# computes. Every other TrainConfig field must equal the run's (``epochs`` too under --cos).
RESUME_MAY_CHANGE = frozenset({"data", "out", "labels", "val", "resume", "device", "workers", "loader", "compile",
                               "tensorboard", "progress", "init", "pretrained", "teacher_check", "dry_run"})
# The student's resolution (res and these) is compared as the schedule it resolves to (student_schedule), not as
# given: with --labels an unset res is the store's, so equal settings can mean another res and vice versa.
RESOLVED_ON_RESUME = ("min_res", "ramp_start", "ramp_end", "res_step")


def _crop_flag(name: str, fresh) -> dataclasses.Field:
    """TrainConfig's crop setting ``name``: unset (None) by default, which means the store's with --labels and
    ``fresh`` otherwise."""
    return store_setting(COUNT if name == "crops_per_image" else declared(CropParams, name), "labels", fresh)


@dataclass
class TrainConfig:
    """Everything ``mealv2 train`` does, refused here (not in the CLI) when a value cannot run, so Python
    callers meet every refusal the CLI gives. Each field is the flag of the same name (``mealv2 train
    --help``), checked at construction against what the flag takes. Give exactly one label source.

    Args:
        data: images to train on (ImageFolder or CSV); DATA.
        out: run folder (last.pt, best.pt, metrics.csv, config.json); --out.
        arch: the student, any timm model name; --arch.
        labels: a label store made by ``mealv2 label`` (stored-label mode); --labels.
        hard_labels: cross-entropy on the dataset's labels; --hard-labels.
        teachers: teacher specs run online on every step's crops; --teachers.
        res: the student's resolution; None: the store's with ``labels`` (another may be given: the
            stored boxes are relative), else 224; --res.
        scale, ratio, crops_per_image: the crops; None: the store's with ``labels`` (a value given must
            equal it), else CropParams' defaults and 4; --scale, --ratio, --crops-per-image.
        epochs, batch_size, lr, ...: as the flags of the same name.
        resume: continue ``out``'s run; :func:`resume_config` builds a config from the run's own settings.

    Example::

        import mealv2
        mealv2.train(mealv2.TrainConfig("data/train", "runs/r18", "resnet18", labels="store", epochs=4))
    """

    data: str = setting(OrNone(LOCAL_PATH))   # None or "": refused by TRAIN_RULES as missing, naming the fix
    out: str = setting(OrNone(LOCAL_PATH))
    arch: str = setting(OrNone(TEXT))
    labels: str | None = setting(OrNone(StorePath()), None)   # stored-label mode
    # With --labels: the store's per-teacher layers mixed with these weights (layer order), instead of its ensemble
    teacher_weights: tuple[float, ...] | None = setting(OrNone(Weights(), means="the store's ensemble"), None)
    hard_labels: bool = setting(FLAG, False)                  # hard-label mode
    teachers: list[str] = setting(SPECS, factory=list)        # online mode
    classes_file: str | None = setting(OrNone(LOCAL_PATH), None)   # online: state-dict teachers' class names
    teacher_classes: dict[int, str] = setting(CLASS_FILES, factory=dict)   # online: teacher N's (--teacher-classes)
    teacher_check: bool = setting(FLAG, True)
    teacher_precision: str = setting(Choice(PRECISIONS), "fp32")
    temperature: float = setting(FLOAT_ABOVE_0, 1.0)
    # The crops: None = the store's with --labels (a res given is the student's and may differ from it, the
    # others must equal it), CropParams' defaults and FRESH_CROPS_PER_IMAGE otherwise (fresh_crop).
    res: int | None = _crop_flag("res", CropParams.res)
    scale: tuple[float, float] | None = _crop_flag("scale", CropParams.scale)
    ratio: tuple[float, float] | None = _crop_flag("ratio", CropParams.ratio)
    crops_per_image: int | None = _crop_flag("crops_per_image", FRESH_CROPS_PER_IMAGE)
    min_res: int | None = setting(OrNone(COUNT), None)   # progressive resizing (res_schedule.py): None = off
    ramp_start: int | None = setting(OrNone(INT_FROM_0), None)
    ramp_end: int | None = setting(OrNone(INT_FROM_0), None)
    res_step: int | None = setting(OrNone(COUNT), None)
    epochs: int = setting(COUNT, 180)
    batch_size: int = setting(COUNT, 512)              # crops per step, over all ranks
    lr: float = setting(FLOAT_FROM_0, 0.01)
    momentum: float = setting(FLOAT_FROM_0, 0.9)
    wd: float = setting(FLOAT_FROM_0, 0.0)
    opt: str = setting(TEXT, "momentum")               # timm's plain SGD with momentum (its "sgd" is Nesterov)
    lr_step: int = setting(COUNT, 100)
    cos: bool = setting(FLAG, False)
    warmup_epochs: int = setting(INT_FROM_0, 0)
    use_discriminator_loss: bool = setting(FLAG, False)
    d_lr: float = setting(FLOAT_FROM_0, 0.01)
    hard_label_weight: float = setting(Number(float, 0, 1), 0.0)   # the dataset labels' share of the loss
    w_cutmix: bool = setting(FLAG, False)
    cutmix_alpha: float = setting(FLOAT_ABOVE_0, 1.0)
    cutmix_prob: float = setting(Number(float, 0, 1), 1.0)
    mixup: float = setting(FLOAT_FROM_0, 0.0)
    model_ema: bool = setting(FLAG, False)             # keep ModelEmaV3 weights beside the raw ones (--model-ema)
    model_ema_decay: float = setting(Number(float, 0, 1), 0.9998)   # timm train.py's default; 1 refused below
    val: str | None = setting(OrNone(LOCAL_PATH), None)
    pretrained: bool = setting(FLAG, False)
    init: str | None = setting(OrNone(LOCAL_PATH), None)
    resume: bool = setting(FLAG, False)
    loader: str = setting(Choice(LOADER_CHOICES), "auto")
    device: str = setting(DEVICE, "auto")
    workers: int = setting(COUNT, factory=available_cores)
    seed: int = setting(INT_FROM_0, 0)
    compile: bool = setting(FLAG, False)
    tensorboard: bool = setting(FLAG, False)
    dry_run: bool = setting(FLAG, False)
    progress: bool = setting(FLAG, True)

    def __post_init__(self):
        check_settings("train", self)
        if self.teacher_weights is not None:   # a list (JSON, a Python caller) compares equal to the flag's tuple
            self.teacher_weights = tuple(self.teacher_weights)
        resolve(self.loader)   # a backend that is not installed is refused before any work
        CropParams(**self.given_crop)   # refuses a scale or ratio out of order or bounds, naming it
        for rule in TRAIN_RULES:
            if message := rule(self):
                raise MealV2Error(f"train: {message}")

    @property
    def fresh_crop(self) -> CropParams:
        """The crops of the fresh-crop modes (--hard-labels, --teachers): the res, scale and ratio given,
        CropParams' defaults for the others. With --labels the store's crops apply (trainer.open_store)."""
        return CropParams(**self.given_crop)

    @property
    def given_crop(self) -> dict:
        """The res, scale and ratio given (not None)."""
        return given(self, CROP_FLAGS)

    @property
    def fresh_crops_per_image(self) -> int:
        return FRESH_CROPS_PER_IMAGE if self.crops_per_image is None else self.crops_per_image

    @property
    def mode(self) -> str:
        return "stored" if self.labels else "hard" if self.hard_labels else "online"


TRAIN_DEFAULTS = field_defaults(TrainConfig)
ONLINE_ONLY = {"temperature": "a store's temperature is the one it was labelled with", "classes_file": "",
               "teacher_classes": "", "teacher_precision": ""}


def _online_only(c: TrainConfig) -> str | None:
    set_ = [name for name in ONLINE_ONLY if getattr(c, name) != TRAIN_DEFAULTS[name]]
    if set_ and not c.teachers:
        name, value = set_[0], getattr(c, set_[0])
        shown = (f"{value:g}" if isinstance(value, float) else
                 " ".join(f"{n}={path}" for n, path in value.items()) if isinstance(value, dict) else value)
        why = f"{ONLINE_ONLY[name]}; " if ONLINE_ONLY[name] else ""
        return f"{flag_name(name)} {shown} applies to online mode (--teachers) only; {why}drop it"
    return None


# The refusals of a config that cannot run, each a function returning the message (None: fine). They run in
# TrainConfig.__post_init__, so the CLI and Python callers meet the same ones.
TRAIN_RULES = (
    lambda c: None if c.data else "DATA is missing: give the images to train on (an ImageFolder or CSV)",
    lambda c: None if c.out else "--out is missing: give the run folder (or --resume RUN)",
    lambda c: None if c.arch else "--arch is missing: give the student, a timm model name (e.g. -a resnet18)",
    lambda c: None if sum([bool(c.labels), c.hard_labels, bool(c.teachers)]) == 1 else
    "give exactly one of --labels STORE, --hard-labels, --teachers SPEC",
    lambda c: "--use-discriminator-loss needs soft targets (--labels or --teachers)"
    if c.use_discriminator_loss and c.hard_labels else None,
    lambda c: f"--hard-label-weight {c.hard_label_weight:g} weighs the dataset's labels in beside soft targets, and "
    f"--hard-labels trains on those labels alone already; drop --hard-label-weight, or train on soft targets "
    f"(--labels STORE or --teachers SPEC)" if c.hard_label_weight and c.hard_labels else None,
    lambda c: "--use-discriminator-loss with --hard-label-weight 1: the discriminator's term is on the distillation "
    "side, which weighs 1 - 1 = 0; lower --hard-label-weight or drop the discriminator"
    if c.hard_label_weight == 1 and c.use_discriminator_loss else None,
    _online_only,
    lambda c: f"--teacher-weights {word(c.teacher_weights)} weighs a store's per-teacher layers; it applies with "
              f"--labels STORE only (online mode weighs teachers with a spec's *WEIGHT)"
    if c.teacher_weights is not None and not c.labels else None,
    lambda c: "--pretrained and --init both set the starting weights; give one" if c.pretrained and c.init else None,
    lambda c: f"--model-ema-decay {c.model_ema_decay:g}: the EMA keeps this share of its weights per update, so it "
              f"must be in [0, 1) (it averages over about 1 / (1 - D) updates: timm's default 0.9998 over 5,000; a "
              f"short run wants a few percent of its updates)" if c.model_ema_decay == 1 else None,
    lambda c: f"--model-ema-decay {c.model_ema_decay:g} applies with --model-ema only"
    if c.model_ema_decay != TRAIN_DEFAULTS["model_ema_decay"] and not c.model_ema else None,
)
