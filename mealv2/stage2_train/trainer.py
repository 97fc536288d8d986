"""Stage 2: train a timm student, in the style of torchvision's references/classification.

Three modes share one loader and one loop:
  stored labels (--labels STORE)   replay the store's crops; target = stored top-k + residual
  hard labels   (--hard-labels)    fresh crops each epoch; cross-entropy on dataset labels
  online        (--teachers SPEC)  fresh crops; the teachers run on every step's crops

Everything random in the data (epoch order, crop boxes, CutMix/mixup draws) is a pure
function of (seed, epoch, step, rank), so ``--resume`` only has to restore the model,
optimizers, torch's RNG (dropout, drop-path), the epoch and the metrics to continue exactly.
The lr is a function of the update count (timm schedulers stepped per update), so the
schedule is rebuilt from the flags rather than restored.

Discriminator (--use-discriminator-loss): MEAL V2's objective, distillation + BCE summed and
minimised by student and discriminator alike, is kept as the default. The original steps both
with one SGD whose schedule also overwrites the discriminator's lr; here the discriminator has
its own SGD (momentum 0.9, constant --d-lr, by default the original's starting lr 0.01) that
applies the discriminator's gradients of that same sum.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm.optim
import timm.scheduler
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..common.crop_loader import View
from ..common.crops import CropParams
from ..common.dataset import build_index
from ..common.distributed import DistInfo, distributed
from ..common.errors import MealV2Error
from ..common.faults import fault_point
from ..common.models import (preview_classes, unwrap_state_dict, create_timm_model, default_data_config,
                             load_checkpoint_file, load_teacher, load_weights, save_checkpoint)
from ..common.store import LabelStore
from ..stage1_label.ensemble import Ensemble
from .loader import FreshLabels, StoredLabels, TrainLoader
from .losses import Discriminator, discriminator_loss, draw_mix, mix_images, mix_targets, soft_cross_entropy
from .utils import RunLog
from .validate import validate

CROP_FLAGS = {"res": "--res", "scale": "--scale", "ratio": "--ratio", "crops_per_image": "--crops-per-image"}
# Flags a resumed run must repeat: they decide what the checkpoint's state means.
RESUME_KEYS = ("arch", "labels", "hard_labels", "teachers", "batch_size", "seed", "crops_per_image")


@dataclass
class TrainConfig:
    data: str
    out: str
    arch: str
    labels: str | None = None           # stored-label mode
    hard_labels: bool = False           # hard-label mode
    teachers: list[str] = field(default_factory=list)  # online mode
    temperature: float = 1.0
    crop: CropParams = CropParams()     # fresh-crop modes; with --labels the store's apply
    crops_per_image: int = 4
    crop_given: tuple[str, ...] = ()    # crop flags typed by the user: checked against the store
    epochs: int = 180
    batch_size: int = 512               # crops per step and rank
    lr: float = 0.01
    momentum: float = 0.9
    wd: float = 0.0
    opt: str = "sgd"
    lr_step: int = 100
    cos: bool = False
    warmup_epochs: int = 0
    use_discriminator_loss: bool = False
    d_lr: float = 0.01
    w_cutmix: bool = False
    cutmix_alpha: float = 1.0
    cutmix_prob: float = 1.0
    mixup: float = 0.0
    val: str | None = None
    pretrained: bool = False
    init: str | None = None
    resume: bool = False
    loader: str = "dali"
    device: str = "auto"
    workers: int = 4
    seed: int = 0
    compile: bool = False
    tensorboard: bool = False
    progress: bool = True

    @property
    def mode(self) -> str:
        return "stored" if self.labels else "hard" if self.hard_labels else "online"


# ---- label sources ----------------------------------------------------------------------------
def open_store(cfg: TrainConfig) -> LabelStore:
    """The store, refused unless complete and made with the crop flags given (if any)."""
    store = LabelStore.open(cfg.labels)  # refuses other format versions, naming both
    if not store.complete:
        raise MealV2Error(f"{store.path}: only {store.rounds_complete()}/{store.rounds_planned} label rounds "
                          f"are complete; finish it by re-running the `mealv2 label` command that made it "
                          f"(it resumes where it stopped)")
    # Every round, not just the first: damage found at epoch 40 would cost the epochs before it.
    problems = store.verify()
    if problems:
        raise MealV2Error(f"{store.path} is damaged, refusing to train on it:\n  " + "\n  ".join(problems[:10])
                          + f"\n`mealv2 verify {store.path}` lists every problem; re-label with the store's "
                          f"`mealv2 label` command")
    stored = {**store.attrs["crop"], "crops_per_image": store.attrs["crops_per_image"]}
    ours = {**cfg.crop.to_attrs(), "crops_per_image": cfg.crops_per_image}
    for name in cfg.crop_given:
        if stored[name] != ours[name]:
            raise MealV2Error(f"{CROP_FLAGS[name]} {ours[name]} differs from the {stored[name]} that {store.path} "
                              f"was labelled with; with --labels the crops come from the store (leave the flag out)")
    return store


def check_store_matches(store: LabelStore, index, data: str) -> None:
    a = store.attrs
    if list(a["classes"]) != list(index.classes):
        raise MealV2Error(f"{store.path} has {len(a['classes'])} classes {preview_classes(a['classes'])}, DATA {data} has "
                          f"{len(index.classes)} classes {preview_classes(index.classes)}")
    if a["dataset"]["fingerprint"] != index.fingerprint:
        raise MealV2Error(f"{store.path} was labelled from a dataset with fingerprint "
                          f"{a['dataset']['fingerprint'][:16]} ({a['dataset']['num_images']} images), DATA {data} "
                          f"has fingerprint {index.fingerprint[:16]} ({len(index)} images); train on the data "
                          f"the store was made from, or label this data with `mealv2 label`")


# ---- training state -----------------------------------------------------------------------------
@dataclass
class TrainState:
    """What one step changes and a checkpoint keeps."""

    model: nn.Module                    # the bare student: checkpoints and validation use it
    forward: nn.Module                  # what training calls (DDP and/or compiled wrapper)
    optimizer: torch.optim.Optimizer
    disc: nn.Module | None = None       # DDP-wrapped when distributed
    d_optimizer: torch.optim.Optimizer | None = None
    epoch: int = 0                      # next epoch to run
    metrics: list[dict] = field(default_factory=list)
    best_top1: float = -1.0

    def checkpoint_state(self, info: DistInfo) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "metrics": self.metrics,
                "best_top1": self.best_top1, "rng": _gather(_rng_state(), info),
                "discriminator": _bare(self.disc).state_dict() if self.disc else None,
                "d_optimizer": self.d_optimizer.state_dict() if self.d_optimizer else None}

    def restore(self, ckpt: dict, info: DistInfo) -> None:
        load_weights(self.model, ckpt["model"], "--resume checkpoint")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.disc is not None:
            if ckpt["discriminator"] is None:
                raise MealV2Error("--resume: the run was started without --use-discriminator-loss")
            _bare(self.disc).load_state_dict(ckpt["discriminator"])
            self.d_optimizer.load_state_dict(ckpt["d_optimizer"])
        self.epoch, self.metrics, self.best_top1 = ckpt["epoch"], ckpt["metrics"], ckpt["best_top1"]
        mine = ckpt["rng"][info.rank % len(ckpt["rng"])]  # a rank of its own if the world size is unchanged
        torch.set_rng_state(mine["torch"])
        if mine["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["cuda"])


def _ddp(module: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP across the ranks when distributed (gradients averaged), the module itself otherwise."""
    if not info.enabled:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def _bare(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _gather(obj, info: DistInfo) -> list:
    """Every rank's ``obj`` (on all ranks), so each rank resumes its own RNG stream."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _all_mean(values: list[float], info: DistInfo) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if info.enabled:
        dist.all_reduce(t)
        t /= info.world_size
    return t.tolist()


# ---- one step and one epoch -------------------------------------------------------------------------
def train_step(state: TrainState, images: torch.Tensor, target: torch.Tensor,
               autocast=contextlib.nullcontext()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward, loss, backward and both optimizers' steps; returns the detached
    (distillation loss, discriminator loss or None).

    With the discriminator the objective is MEAL V2's sum (distillation + BCE); one backward
    pass gives the student its gradients and the discriminator its own, which its optimizer applies.
    """
    with autocast:
        logits = state.forward(images)
    loss = soft_cross_entropy(logits, target)
    d_loss = discriminator_loss(state.disc, logits, target) if state.disc is not None else None
    state.optimizer.zero_grad(set_to_none=True)
    if d_loss is not None:
        state.d_optimizer.zero_grad(set_to_none=True)
    (loss if d_loss is None else loss + d_loss).backward()
    state.optimizer.step()
    if d_loss is not None:
        state.d_optimizer.step()
        d_loss = d_loss.detach()
    return loss.detach(), d_loss


def train_one_epoch(state: TrainState, loader: TrainLoader, scheduler, epoch: int, cfg: TrainConfig,
                    num_classes: int, ensemble: Ensemble | None, teacher_views: list[int], info: DistInfo,
                    device: torch.device) -> dict:
    """One pass over the epoch's batches; returns this epoch's row of metrics (rank-averaged)."""
    state.forward.train()
    if state.disc is not None:
        state.disc.train()
    steps = len(loader)
    crops_per_step = loader.images_per_step * loader.crops_per_image
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    bar = tqdm(total=steps * crops_per_step * info.world_size, unit="img", unit_scale=True, dynamic_ncols=True,
               desc=f"epoch {epoch}/{cfg.epochs}", disable=not (cfg.progress and info.is_main), leave=False)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    d_loss_sum = torch.zeros_like(loss_sum)
    done = 0
    started, started_cpu = time.perf_counter(), time.process_time()
    for step, batch in enumerate(loader(epoch)):
        scheduler.step_update(num_updates=epoch * steps + step)  # the lr is a function of the update count
        if step == 0:
            lr = state.optimizer.param_groups[0]["lr"]
        views, target = batch.views, batch.target
        mix = draw_mix(np.random.default_rng([cfg.seed, epoch, step, info.rank]), cfg.cutmix_alpha if cfg.w_cutmix
                       else 0.0, cfg.cutmix_prob, cfg.mixup, shift=loader.crops_per_image)
        if mix is not None:
            # Online, every view is mixed and the teachers label the mixed crops (MEAL V2's --w-cutmix);
            # otherwise the stored / dataset targets are mixed by the area each crop keeps.
            mixed = [mix_images(mix, v) for v in views]
            views, lam = [v for v, _ in mixed], mixed[0][1]
            if ensemble is None:
                target = mix_targets(mix, lam, target, num_classes)
        if ensemble is not None:
            target = ensemble.probs([views[i] for i in teacher_views])
        images = views[0].contiguous(memory_format=torch.channels_last) if device.type == "cuda" else views[0]
        loss, d_loss = train_step(state, images, target, autocast)
        fault_point("train_step")
        loss_sum += loss
        if d_loss is not None:
            d_loss_sum += d_loss
        done += 1
        if done == 1:  # throughput is timed from the end of the first step: warm-up left out
            first_done, first_cpu = time.perf_counter(), time.process_time()
        bar.update(crops_per_step * info.world_size)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    seconds = time.perf_counter() - (first_done if done > 1 else started)
    cpu_seconds = time.process_time() - (first_cpu if done > 1 else started_cpu)
    timed_steps = done - 1 if done > 1 else done
    loss_mean, d_loss_mean = (float(v) / max(done, 1) for v in (loss_sum, d_loss_sum))
    loss_mean, d_loss_mean = _all_mean([loss_mean, d_loss_mean], info)
    return {"epoch": epoch, "lr": lr, "loss": loss_mean,
            "d_loss": d_loss_mean if state.disc is not None else None,
            "img_per_s": round(timed_steps * crops_per_step * info.world_size / max(seconds, 1e-9), 1),
            # CPU seconds of this process (all its threads: torch's and DALI's) per crop, for `bench train`:
            # unlike img/s it barely moves when other processes share the CPU. Not in metrics.csv.
            "cpu_s_per_img": cpu_seconds / (timed_steps * crops_per_step),
            "steps_per_rank": _gather(done, info)}


# ---- the run -------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> list[dict]:
    """Run (or resume) a training run; returns the metrics rows of every epoch so far."""
    with distributed(cfg.device) as (info, device):
        return _train(cfg, info, device)


def _train(cfg: TrainConfig, info: DistInfo, device: torch.device) -> list[dict]:
    run = Path(cfg.out)
    say = print if info.is_main else (lambda *a, **k: None)

    # Data and labels: refuse mismatches before anything is trained.
    store = open_store(cfg) if cfg.mode == "stored" else None
    skip_bad = bool(store and store.attrs["dataset"]["skipped"])
    index = build_index(cfg.data, skip_bad=skip_bad, workers=max(cfg.workers, 8))
    classes = index.classes
    if store is not None:
        check_store_matches(store, index, cfg.data)
        crop = CropParams.from_attrs(store.attrs["crop"])
        labels = StoredLabels(store)
        if cfg.epochs > labels.rounds:
            say(f"mealv2 train: warning: {cfg.epochs} epochs but {store.path} has {labels.rounds} label rounds; "
                f"epoch e replays round e mod {labels.rounds} (label more with `mealv2 label ... --rounds N`)")
    else:
        crop = cfg.crop
        labels = FreshLabels(cfg.seed, index.sizes, cfg.crops_per_image, crop,
                             index.labels if cfg.mode == "hard" else None)
    val_index = build_index(cfg.val, workers=max(cfg.workers, 8)) if cfg.val else None
    if val_index is not None and list(val_index.classes) != list(classes):
        raise MealV2Error(f"--val {cfg.val} has {len(val_index.classes)} classes {preview_classes(val_index.classes)}, "
                          f"DATA {cfg.data} has {len(classes)} {preview_classes(classes)}")
    if not cfg.resume and (run / "last.pt").exists():
        raise MealV2Error(f"{run} already holds a run (last.pt); pass --resume to continue it or choose another --out")
    checkpoint = _resume_checkpoint(run, cfg) if cfg.resume else None

    # Student: timm model, its own normalisation, the crop resolution of the labels.
    torch.manual_seed(cfg.seed)
    model = create_timm_model(cfg.arch, len(classes), pretrained=cfg.pretrained, where=f"-a {cfg.arch}")
    if cfg.init:
        load_weights(model, unwrap_state_dict(load_checkpoint_file(cfg.init), cfg.init), f"--init {cfg.init}")
    _, mean, std = default_data_config(model)
    student_view = View(crop.res, mean, std)
    model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)

    ensemble = None
    views = [student_view]
    if cfg.mode == "online":
        ensemble = Ensemble([load_teacher(spec, classes) for spec in cfg.teachers], device, cfg.temperature)
        views += [v for v in ensemble.views if v != student_view]  # one pipeline call renders all views
    teacher_views = [views.index(v) for v in ensemble.views] if ensemble else []

    loader = TrainLoader(index, labels, views, max(1, cfg.batch_size // labels.crops_per_image), cfg.seed, device,
                         backend=cfg.loader, workers=cfg.workers, rank=info.rank, world_size=info.world_size)

    try:
        optimizer = timm.optim.create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.wd,
                                                   momentum=cfg.momentum)
    except (ValueError, AssertionError) as e:
        raise MealV2Error(f"--opt {cfg.opt}: {e}") from e
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, sched="cosine" if cfg.cos else "step", num_epochs=cfg.epochs, decay_epochs=cfg.lr_step,
        decay_rate=0.1, warmup_epochs=cfg.warmup_epochs, step_on_epochs=False, updates_per_epoch=len(loader))

    forward = _ddp(model, info, device)
    forward = torch.compile(forward) if cfg.compile else forward
    state = TrainState(model=model, forward=forward, optimizer=optimizer)
    if cfg.use_discriminator_loss:
        disc = Discriminator(len(classes)).to(device)
        state.disc = _ddp(disc, info, device)
        state.d_optimizer = torch.optim.SGD(disc.parameters(), lr=cfg.d_lr, momentum=0.9)
    if checkpoint is not None:
        state.restore(checkpoint, info)
        say(f"mealv2 train: resuming {run / 'last.pt'} at epoch {state.epoch}")

    log = None
    if info.is_main:
        run.mkdir(parents=True, exist_ok=True)
        log = RunLog(run, cfg.tensorboard)
    say(f"mealv2 train: {cfg.mode} labels, {cfg.arch} at {crop.res}px, {len(index)} images x "
        f"{labels.crops_per_image} crops, {loader.images_per_step * labels.crops_per_image} crops/step x "
        f"{info.world_size} rank(s), {len(loader)} steps/epoch, device {device.type}, loader {cfg.loader}")
    for epoch in range(state.epoch, cfg.epochs):
        started = time.perf_counter()
        row = train_one_epoch(state, loader, scheduler, epoch, cfg, len(classes), ensemble, teacher_views,
                              info, device)
        steps_per_rank = row.pop("steps_per_rank")
        row["val_top1"] = row["val_top5"] = None
        if val_index is not None and info.is_main:
            acc = validate(model, val_index, crop.res, mean, std, cfg.batch_size, device, cfg.workers)
            row["val_top1"], row["val_top5"] = acc["top1"], acc["top5"]
        improved = row["val_top1"] is not None and row["val_top1"] > state.best_top1
        state.epoch, state.metrics = epoch + 1, state.metrics + [row]
        state.best_top1 = row["val_top1"] if improved else state.best_top1
        extra = state.checkpoint_state(info)  # collective (RNG gather): every rank takes part
        if info.is_main:
            meta = dict(arch=cfg.arch, classes=classes, res=crop.res, mean=mean, std=std,
                        train_config=dataclasses.asdict(cfg))
            save_checkpoint(run / "last.pt", model=model, **meta, **extra)
            if improved:
                save_checkpoint(run / "best.pt", model=model, **meta, **extra)
            log.write(state.metrics)
        say(_summary(row, cfg.epochs, steps_per_rank, time.perf_counter() - started))
        info.barrier()
    return state.metrics


def _summary(row: dict, epochs: int, steps_per_rank: list[int], seconds: float) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"lr {row['lr']:.3g}", f"loss {row['loss']:.4f}"]
    if row["d_loss"] is not None:
        parts.append(f"d_loss {row['d_loss']:.4f}")
    if row["val_top1"] is not None:
        parts.append(f"val top1 {row['val_top1']:.2f} top5 {row['val_top5']:.2f}")
    parts += [f"{row['img_per_s']:.0f} img/s", f"steps per rank {steps_per_rank}", f"{seconds:.1f}s"]
    return "  ".join(parts)


def _resume_checkpoint(run: Path, cfg: TrainConfig) -> dict:
    path = run / "last.pt"
    if not path.is_file():
        raise MealV2Error(f"--resume: {path} does not exist; start the run without --resume")
    ckpt = load_checkpoint_file(path)
    saved = ckpt.get("train_config", {})
    ours = dataclasses.asdict(cfg)
    diff = [f"{k}: {path} has {saved.get(k)!r}, this command {ours[k]!r}" for k in RESUME_KEYS
            if saved.get(k) != ours[k]]
    if diff:
        raise MealV2Error("--resume with other settings than the run was started with:\n  " + "\n  ".join(diff))
    return ckpt

