"""TrainConfig: everything `mealv2 train` does, and the refusals of a config that cannot run.

The rules live here, not in click, so Python callers meet every refusal of the CLI; `commands.py` only
builds a TrainConfig from the flags.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..common.config import field_defaults, flag_name
from ..common.data.crops import CropParams
from ..common.data.loaders.registry import available_cores, resolve
from ..common.errors import MealV2Error, require_finite, require_in_range

CROP_FLAGS = {"res": "--res", "scale": "--scale", "ratio": "--ratio", "crops_per_image": "--crops-per-image"}
# Settings a resumed run may change: where things are and how the run is executed, not what it
# computes. Every other TrainConfig field must equal the run's (``epochs`` too under --cos).
RESUME_MAY_CHANGE = frozenset({"data", "out", "labels", "val", "resume", "device", "workers", "loader", "compile",
                               "tensorboard", "progress", "init", "pretrained", "crop_given", "teacher_check",
                               "dry_run"})
# The student's resolution is compared as the schedule it resolves to (student_schedule), not as typed:
# with --labels an untyped --res is the store's, so equal flags can mean another res and vice versa.
RESOLVED_ON_RESUME = ("min_res", "ramp_start", "ramp_end", "res_step")
# The ranges the flags take (min, max or None, min excluded), which TrainConfig applies in Python too.
AT_LEAST_1, AT_LEAST_0, ABOVE_0 = (1, None, False), (0, None, False), (0, None, True)
TRAIN_RANGES = {"epochs": AT_LEAST_1, "batch_size": AT_LEAST_1, "lr_step": AT_LEAST_1, "crops_per_image": AT_LEAST_1,
                "min_res": AT_LEAST_1, "res_step": AT_LEAST_1, "workers": AT_LEAST_1, "warmup_epochs": AT_LEAST_0,
                "ramp_start": AT_LEAST_0, "ramp_end": AT_LEAST_0, "seed": AT_LEAST_0, "lr": AT_LEAST_0,
                "momentum": AT_LEAST_0, "wd": AT_LEAST_0, "d_lr": AT_LEAST_0, "mixup": AT_LEAST_0,
                "temperature": ABOVE_0, "cutmix_alpha": ABOVE_0, "cutmix_prob": (0, 1, False),
                "hard_label_weight": (0, 1, False),
                "model_ema_decay": (0, 1, False)}   # 1 itself is refused by __post_init__, saying why


@dataclass
class TrainConfig:
    """Everything ``mealv2 train`` does, refused here (not in the CLI) when a value cannot run, so Python
    callers meet every refusal the CLI gives. Each field is the flag of the same name (``mealv2 train
    --help``); ``crop`` holds --res/--scale/--ratio. Give exactly one label source.

    Args:
        data: images to train on (ImageFolder or CSV); DATA.
        out: run folder (last.pt, best.pt, metrics.csv, config.json); --out.
        arch: the student, any timm model name; --arch.
        labels: a label store made by ``mealv2 label`` (stored-label mode); --labels.
        hard_labels: cross-entropy on the dataset's labels; --hard-labels.
        teachers: teacher specs run online on every step's crops; --teachers.
        crop: the student's res and, without --labels, the crop distribution; --res/--scale/--ratio.
        crop_given: the crop flags the user typed, checked against the store (with --labels an untyped
            res is the store's).
        epochs, batch_size, lr, ...: as the flags of the same name.
        resume: continue ``out``'s run; :func:`resume_config` builds a config from the run's own settings.

    Example::

        import mealv2
        mealv2.train(mealv2.TrainConfig("data/train", "runs/r18", "resnet18", labels="store", epochs=4))
    """

    data: str
    out: str
    arch: str
    labels: str | None = None           # stored-label mode
    hard_labels: bool = False           # hard-label mode
    teachers: list[str] = field(default_factory=list)  # online mode
    classes_file: str | None = None     # online mode: state-dict teachers' class names in output order
    teacher_classes: dict[int, str] = field(default_factory=dict)  # online mode: teacher N's (--teacher-classes)
    teacher_check: bool = True
    teacher_precision: str = "fp32"
    temperature: float = 1.0
    crop: CropParams = CropParams()     # fresh-crop modes; with --labels the store's apply
    crops_per_image: int = 4
    crop_given: tuple[str, ...] = ()    # crop flags typed by the user: checked against the store
    min_res: int | None = None          # progressive resizing (res_schedule.py): None = every epoch at --res
    ramp_start: int | None = None
    ramp_end: int | None = None
    res_step: int | None = None
    epochs: int = 180
    batch_size: int = 512               # crops per step, over all ranks
    lr: float = 0.01
    momentum: float = 0.9
    wd: float = 0.0
    opt: str = "momentum"               # timm's plain SGD with momentum (its "sgd" is Nesterov)
    lr_step: int = 100
    cos: bool = False
    warmup_epochs: int = 0
    use_discriminator_loss: bool = False
    hard_label_weight: float = 0.0      # loss = A * CE(dataset labels) + (1 - A) * distillation; 0 = MEAL V2
    d_lr: float = 0.01
    w_cutmix: bool = False
    cutmix_alpha: float = 1.0
    cutmix_prob: float = 1.0
    mixup: float = 0.0
    model_ema: bool = False             # keep ModelEmaV3 weights beside the raw ones (timm's --model-ema)
    model_ema_decay: float = 0.9998     # timm train.py's default
    val: str | None = None
    pretrained: bool = False
    init: str | None = None
    resume: bool = False
    loader: str = "auto"
    device: str = "auto"
    workers: int = field(default_factory=available_cores)
    seed: int = 0
    compile: bool = False
    tensorboard: bool = False
    dry_run: bool = False
    progress: bool = True

    def __post_init__(self):
        resolve(self.loader)   # a backend that is not installed is refused before any work
        require_finite("train", temperature=self.temperature, lr=self.lr, momentum=self.momentum, wd=self.wd,
                       d_lr=self.d_lr, cutmix_alpha=self.cutmix_alpha, cutmix_prob=self.cutmix_prob, mixup=self.mixup,
                       model_ema_decay=self.model_ema_decay, hard_label_weight=self.hard_label_weight)
        require_in_range("train", TRAIN_RANGES, **{name: getattr(self, name) for name in TRAIN_RANGES})
        if not 0 <= self.model_ema_decay < 1:
            raise MealV2Error(f"--model-ema-decay {self.model_ema_decay:g}: the EMA keeps this share of its weights "
                              f"per update, so it must be in [0, 1) (it averages over about 1 / (1 - D) updates: timm's "
                              f"default 0.9998 over 5,000; a short run wants a few percent of its updates)")
        for rule in TRAIN_RULES:
            if message := rule(self):
                raise MealV2Error(f"train: {message}")

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
    lambda c: "--pretrained and --init both set the starting weights; give one" if c.pretrained and c.init else None,
    lambda c: f"--model-ema-decay {c.model_ema_decay:g} applies with --model-ema only"
    if c.model_ema_decay != TRAIN_DEFAULTS["model_ema_decay"] and not c.model_ema else None,
)
