"""Stage 2: train a timm student, in the style of torchvision's references/classification.

Three modes share one loader and one loop; each is an object (modes.py) that gives the loop its
labels, views, targets and objective, so the loop never asks which mode it runs:
  stored labels (--labels STORE)   replay the store's crops; target = stored top-k + residual
  hard labels   (--hard-labels)    fresh crops each pass; cross-entropy on dataset labels
  online        (--teachers SPEC)  fresh crops; the teachers run on every step's crops

Units: an epoch is N crops (N images), as MEAL V2 and FKD count it, at any crops per image C;
``--epochs``, ``--lr-step``, ``--warmup-epochs``, checkpoints and metrics.csv use it (the
loader module says how epochs sit in the passes over the data). ``--batch-size`` is the
global batch in crops, over all ranks, as in MEAL V2's recipe (512).

Resolution: ``--res`` is the student's in every mode; with --labels it defaults to the store's and
may differ from it (the stored boxes are relative and a soft label describes a box's content, so
the student renders them at any size). Progressive resizing (res_schedule.py) sets it per epoch.
Validation runs at the final res in every epoch, as FFCV's recipe does, and checkpoints record
the final res (not the epoch's): the res their val top-1 was measured at, which `mealv2 eval` and
`mealv2 label -t CKPT` then use by default (``eval --res`` may test at another, as FixRes does).

Everything random in the data (pass order, crop boxes, CutMix/mixup draws) is a pure function
of (seed, pass, step, rank), so ``--resume`` only has to restore the model, optimizers,
torch's RNG (dropout, drop-path), the epoch and the metrics to continue exactly; it refuses a
command whose training settings differ from the run's. The lr is a function of the update
count (timm schedulers stepped per update), so the schedule is rebuilt from the flags.

Temperature: a store made with ``--temperature T`` (or online ``--temperature T``) holds the
teachers' softmax(z / T); the student's logits are divided by T too and the loss is scaled by
T^2 (Hinton et al.). Evaluation and checkpoints use the plain logits.

Discriminator (--use-discriminator-loss): MEAL V2's objective, distillation + BCE summed and
minimised by student and discriminator alike, is kept as the default. The original steps both
with one SGD whose schedule also overwrites the discriminator's lr; here the discriminator has
its own SGD (momentum 0.9, constant --d-lr, by default the original's starting lr 0.01) that
applies the discriminator's gradients of that same sum. With stored labels both of its inputs
are reduced to the store's top-k form (losses.discriminator_loss says why).

Hard labels beside the soft targets (--hard-label-weight A): the loader yields each crop's dataset
label with its target, mixed by CutMix/mixup as the target is; losses.objective_losses weighs them.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import timm.optim
import timm.scheduler
import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .. import __version__
from ..common.data.dataset import DatasetIndex, build_index_shared, refuse_nested
from ..common.data.loaders.base import View
from ..common.data.loaders.registry import describe
from ..common.config import config_args
from ..common.errors import MealV2Error
from ..common.models.checkpoints import (create_timm_model, default_data_config, load_checkpoint_file, load_weights,
                                         save_checkpoint, unwrap_state_dict)
from ..common.models.distributed import DistInfo, distributed
from ..common.models.runtime import Runtime
from ..common.store.faults import fault_point
from ..common.store.locks import check_writable, hold_lock
from .config import RESOLVED_ON_RESUME, RESUME_MAY_CHANGE, TRAIN_DEFAULTS, TrainConfig
from .loader import TrainLoader, images_per_step
from .losses import Discriminator, Mix, draw_step_mix, mix_images, mix_targets
from .modes import EpochViews, Mode, Objective, make_mode, shown_res
from .replay import check_student_res
from .res_schedule import ResSchedule, res_schedule
from .run_config import current_settings
from .run_data import RECORD_KEY, check_run_data, record_summary, run_data_record
from .utils import RUN_LOCK, RunLog, write_run_config
from .validate import DecodedVal, class_order, validate


# ---- training state -----------------------------------------------------------------------------
@dataclass
class TrainState:
    """What one step changes and a checkpoint keeps."""

    model: nn.Module                    # the bare student: checkpoints and validation use it
    forward: nn.Module                  # what training calls (DDP and/or compiled wrapper)
    optimizer: torch.optim.Optimizer
    disc: nn.Module | None = None       # DDP-wrapped when distributed
    d_optimizer: torch.optim.Optimizer | None = None
    ema: ModelEmaV3 | None = None       # --model-ema: updated after every optimizer step
    epoch: int = 0                      # next epoch to run
    metrics: list[dict] = field(default_factory=list)
    best_top1: float = -1.0

    def checkpoint_state(self, info: DistInfo) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "metrics": self.metrics,
                "best_top1": self.best_top1, "rng": info.gather_object(_rng_state()),
                "discriminator": _bare(self.disc).state_dict() if self.disc else None,
                "d_optimizer": self.d_optimizer.state_dict() if self.d_optimizer else None,
                "model_ema": self.ema.module.state_dict() if self.ema else None}

    def restore(self, ckpt: dict, info: DistInfo) -> None:
        load_weights(self.model, ckpt["model"], "--resume checkpoint")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.disc is not None:
            _bare(self.disc).load_state_dict(ckpt["discriminator"])
            self.d_optimizer.load_state_dict(ckpt["d_optimizer"])
        if self.ema is not None:
            load_weights(self.ema.module, ckpt["model_ema"], "--resume checkpoint's EMA weights")
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


# ---- one step and one epoch -------------------------------------------------------------------------
def train_step(state: TrainState, images: torch.Tensor, target: torch.Tensor, runtime: Runtime,
               objective: Objective = Objective(),
               labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward, loss, backward and both optimizers' steps; returns the detached
    (distillation loss, discriminator loss or None).

    With the discriminator the objective is MEAL V2's sum (distillation + BCE); one backward
    pass gives the student its gradients and the discriminator its own, which its optimizer applies.
    """
    with runtime.autocast():
        logits = state.forward(images)
    loss, d_loss = objective.losses(logits, target, state.disc, labels)
    state.optimizer.zero_grad(set_to_none=True)
    if d_loss is not None:
        state.d_optimizer.zero_grad(set_to_none=True)
    (loss if d_loss is None else loss + d_loss).backward()
    state.optimizer.step()
    if d_loss is not None:
        state.d_optimizer.step()
        d_loss = d_loss.detach()
    return loss.detach(), d_loss


def mix_views(mix: Mix | None, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """Every view mixed alike (the CutMix box is relative), and the weight of each crop's own image
    in them; the views unchanged at a step that draws no mixing."""
    if mix is None:
        return views, 1.0
    mixed = [mix_images(mix, v) for v in views]
    return [v for v, _ in mixed], mixed[0][1]


def train_one_epoch(state: TrainState, loader: TrainLoader, views: EpochViews, scheduler, epoch: int,
                    cfg: TrainConfig, mode: Mode, info: DistInfo, runtime: Runtime) -> dict:
    """One epoch's steps with ``views`` from :meth:`Mode.views` (the student's at this epoch's
    res); returns this epoch's row of metrics (rank-averaged)."""
    state.forward.train()
    if state.disc is not None:
        state.disc.train()
    steps = len(loader)
    crops_per_rank = loader.images_per_step * loader.crops_per_image
    bar = tqdm(total=steps * loader.crops_per_step, unit="img", unit_scale=True, dynamic_ncols=True,
               desc=f"epoch {epoch}/{cfg.epochs}", disable=not (cfg.progress and info.is_main), leave=False)
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    d_loss_sum = torch.zeros_like(loss_sum)
    first_bad = torch.full((), -1, dtype=torch.int64, device=runtime.device)   # no sync per step: read at the end
    done = 0
    started, started_cpu = time.perf_counter(), time.process_time()
    for step, batch in enumerate(loader.epoch(epoch, views.rendered)):
        update = epoch * steps + step
        scheduler.step_update(num_updates=update)  # the lr is a function of the update count
        if step == 0:
            lr = state.optimizer.param_groups[0]["lr"]
        mix = draw_step_mix(cfg.seed, update, info.rank, loader.crops_per_image,
                            cfg.cutmix_alpha if cfg.w_cutmix else 0.0, cfg.cutmix_prob, cfg.mixup)
        rendered, lam = mix_views(mix, batch.views)
        target = mode.targets(batch.target, rendered, views, mix, lam)
        labels = batch.labels   # the dataset's labels beside soft targets (--hard-label-weight), mixed alike
        if labels is not None and mix is not None:
            labels = mix_targets(mix, lam, labels, len(mode.classes))
        loss, d_loss = train_step(state, runtime.input(rendered[0]), target, runtime, mode.objective, labels)
        if state.ema is not None:
            # The decay is a function of the update count (timm's train.py passes it too): resume stays exact.
            state.ema.update(state.model, step=update + 1)
        fault_point("train_step")
        bad = ~torch.isfinite(loss if d_loss is None else loss + d_loss)
        first_bad = torch.where(bad & (first_bad < 0), update, first_bad)
        loss_sum += loss
        if d_loss is not None:
            d_loss_sum += d_loss
        done += 1
        if done == 1:  # throughput is timed from the end of the first step: warm-up left out
            first_done, first_cpu = time.perf_counter(), time.process_time()
        bar.update(loader.crops_per_step)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    seconds = time.perf_counter() - (first_done if done > 1 else started)
    cpu_seconds = time.process_time() - (first_cpu if done > 1 else started_cpu)
    timed_steps = done - 1 if done > 1 else done
    loss_mean, d_loss_mean = info.all_mean([float(v) / max(done, 1) for v in (loss_sum, d_loss_sum)])
    return {"epoch": epoch, "res": views.rendered[0].res, "lr": lr, "loss": loss_mean,
            "d_loss": d_loss_mean if state.disc is not None else None,
            "img_per_s": round(timed_steps * loader.crops_per_step / max(seconds, 1e-9), 1),
            "crops_seen": (epoch + 1) * steps * loader.crops_per_step,
            # CPU seconds of this process (all its threads: torch's and DALI's) per crop, for `bench train`:
            # unlike img/s it barely moves when other processes share the CPU. Not in metrics.csv.
            "cpu_s_per_img": cpu_seconds / (timed_steps * crops_per_rank),
            "steps_per_rank": info.gather_object(done), "first_nonfinite_update": int(first_bad)}


# ---- the run -------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> list[dict]:
    """Run (or resume) a training run, as ``mealv2 train`` does (which only builds ``cfg``).

    Args:
        cfg: the run's settings; :func:`resume_config` makes the one that continues a run.

    Returns:
        The metrics row of every epoch so far (epoch, res, lr, loss, d_loss, val_top1, val_top5, img_per_s,
        ...); empty with ``dry_run``.

    Example::

        rows = mealv2.train(mealv2.TrainConfig("data/train", "runs/r18", "resnet18", labels="store", epochs=4))
        print(rows[-1]["val_top1"])
    """
    refuse_nested(cfg.data, cfg.out, "--out")
    try:
        with distributed(cfg.device) as (info, device), run_folder(cfg, info):
            return _train(cfg, info, device)
    except KeyboardInterrupt:
        _say_how_to_continue(cfg)
        raise


def _say_how_to_continue(cfg: TrainConfig) -> None:
    """After Ctrl-C, the command that continues the run from its last checkpoint (the user will want it):
    this config's command, resumed (common.config.config_args)."""
    last = Path(cfg.out) / "last.pt"
    if last.is_file() and not cfg.dry_run and os.environ.get("RANK", "0") == "0":   # once, not per rank
        command = shlex.join(["mealv2", "train", *config_args(dataclasses.replace(cfg, resume=True))])
        print(f"\nmealv2 train: interrupted; {last} holds the last finished epoch. Continue the run with:\n"
              f"  {command}", file=sys.stderr)


@contextmanager
def run_folder(cfg: TrainConfig, info: DistInfo):
    """The run folder, writable and locked for the run's life by the one process that writes it
    (rank 0): two runs into one --out would delete each other's temp files and mix their
    checkpoints. The lock (common/store/locks.py) lives inside the folder, so every path to it shares
    it; --dry-run checks the folder can be written and is not in use, and makes nothing. A refused
    run leaves no folder it made."""
    run = Path(cfg.out)
    if not info.is_main:
        yield
        return
    check_writable(run, "--out")
    lock_file = Path(os.path.realpath(run)) / RUN_LOCK
    if cfg.dry_run:
        if lock_file.exists():
            hold_lock(lock_file, run, "train", record=False).release()
        yield
        return
    made = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    lock = hold_lock(lock_file, run, "train")
    try:
        yield
    finally:
        lock.release()
        if made and [p.name for p in run.iterdir()] == [RUN_LOCK]:
            lock_file.unlink(missing_ok=True)
            run.rmdir()


def check_mix_pairs(cfg: TrainConfig, per_step: int, crops_per_image: int, world_size: int) -> None:
    """CutMix and mixup pair each crop with the same crop of another image of the rank's step
    (losses.mix_images); with one image per rank and step every crop would be mixed with itself,
    changing neither images nor targets while the run reports mixing. Refused, naming the sizes that pair."""
    if per_step >= 2 or not (cfg.w_cutmix or cfg.mixup > 0):
        return
    flag = "--w-cutmix" if cfg.w_cutmix else f"--mixup {cfg.mixup:g}"
    unit = crops_per_image * world_size
    raise MealV2Error(f"{flag} mixes each crop with the same crop of another image in its rank's step, but "
                      f"--batch-size {cfg.batch_size} over {world_size} rank(s) x {crops_per_image} crops per image "
                      f"gives each rank {per_step} image per step: every crop would be mixed with itself. Use "
                      f"--batch-size {2 * unit} or more (a multiple of {unit}: 2 images per rank and step)")


def _train(cfg: TrainConfig, info: DistInfo, device: torch.device) -> list[dict]:
    run = Path(cfg.out)
    say = print if info.is_main else (lambda *a, **k: None)

    # Data and labels: the mode reads its labels and refuses mismatches before anything is trained.
    mode = make_mode(cfg, info, say)
    classes, crop, schedule = mode.classes, mode.crop, mode.schedule
    val_index = build_index_shared(cfg.val, info, workers=max(cfg.workers, 8)) if cfg.val else None
    val_order = class_order(classes, val_index, f"--val {cfg.val}") if val_index is not None else None
    val_decoded = DecodedVal()   # decoded at the first validation, reused at every later one
    if val_order is not None:
        say(f"--val {cfg.val}: its {len(val_index.classes)} classes are mapped by name onto the student's "
            f"{len(classes)}; top-1/top-5 are taken among those {len(val_index.classes)}")
    if not cfg.resume and (run / "last.pt").exists() and not cfg.dry_run:
        raise MealV2Error(f"{run} already holds a run (last.pt); pass --resume to continue it or choose another --out")
    checkpoint = _resume_checkpoint(run, cfg, mode, val_index=val_index, info=info, say=say) if cfg.resume else None
    crops_per_image = mode.labels.crops_per_image
    per_step = images_per_step(cfg.batch_size, crops_per_image, info.world_size)
    check_mix_pairs(cfg, per_step, crops_per_image, info.world_size)

    # Student: timm model, its own normalisation, the crop resolution of the labels.
    torch.manual_seed(cfg.seed)
    runtime = Runtime(device)
    model = create_timm_model(cfg.arch, len(classes), pretrained=cfg.pretrained, where=f"-a {cfg.arch}")
    if cfg.init:
        load_weights(model, unwrap_state_dict(load_checkpoint_file(cfg.init), cfg.init), f"--init {cfg.init}")
    _, mean, std = default_data_config(model)
    runtime.model(model)
    check_student_res(model, {schedule.at(e) for e in range(cfg.epochs)}, runtime, where=f"-a {cfg.arch}",
                      fix="--res, --min-res")
    mode.prepare(device=device, run=run, info=info, say=say, resuming=checkpoint is not None)

    loader = TrainLoader(mode.index, mode.labels, mode.views(View(crop.res, mean, std)).rendered, per_step, cfg.seed,
                         device, backend=cfg.loader, workers=cfg.workers, rank=info.rank, world_size=info.world_size,
                         hard_labels=mode.hard_labels(), **mode.loader_checks())

    try:
        optimizer = timm.optim.create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.wd,
                                                   momentum=cfg.momentum)
    except (ValueError, AssertionError) as e:
        raise MealV2Error(f"--opt {cfg.opt}: {e}") from e
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, sched="cosine" if cfg.cos else "step", num_epochs=cfg.epochs, decay_epochs=cfg.lr_step,
        decay_rate=0.1, warmup_epochs=cfg.warmup_epochs, step_on_epochs=False, updates_per_epoch=len(loader))

    say(plan_text(cfg, loader, mode, info, scheduler))
    if cfg.dry_run:
        return []
    images = run_data_record(mode.index, val_index)   # every checkpoint's record of DATA and --val (run_data.py)
    if info.is_main:
        run.mkdir(parents=True, exist_ok=True)
        resolved = dict(mode=mode.name, classes=list(classes), crop=crop.to_attrs(), crops_per_image=crops_per_image,
                        student_res=[schedule.at(e) for e in range(cfg.epochs)], mean=list(mean), std=list(std),
                        temperature=mode.objective.temperature, topk=mode.objective.topk,
                        world_size=info.world_size, images_per_step_per_rank=per_step, steps_per_epoch=len(loader),
                        loader=loader.backend, device=device.type, store=mode.store_record(),
                        images=record_summary(images), mealv2_version=__version__)
        write_run_config(run, cfg, resolved)

    forward = _ddp(model, info, device)
    forward = torch.compile(forward) if cfg.compile else forward
    state = TrainState(model=model, forward=forward, optimizer=optimizer)
    if cfg.model_ema:
        # A copy of the bare student on its device and memory format: its first update copies the weights.
        state.ema = ModelEmaV3(model, decay=cfg.model_ema_decay)
    if cfg.use_discriminator_loss:
        disc = Discriminator(len(classes)).to(device)
        state.disc = _ddp(disc, info, device)
        state.d_optimizer = torch.optim.SGD(disc.parameters(), lr=cfg.d_lr, momentum=0.9)
    if checkpoint is not None:
        state.restore(checkpoint, info)
        say(f"mealv2 train: resuming {run / 'last.pt'} at epoch {state.epoch}")

    log = RunLog(run, cfg.tensorboard) if info.is_main else None
    for epoch in range(state.epoch, cfg.epochs):
        started = time.perf_counter()
        row = train_one_epoch(state, loader, mode.views(View(schedule.at(epoch), mean, std)), scheduler, epoch, cfg,
                              mode, info, runtime)
        steps_per_rank = row.pop("steps_per_rank")
        check_finite(state.model, row.pop("first_nonfinite_update"), epoch, len(loader), scheduler, run, info)
        row["val_top1"] = row["val_top5"] = row["val_ema_top1"] = row["val_ema_top5"] = None
        if val_index is not None:
            scored = {"val": model, "val_ema": state.ema.module if state.ema else None}
            for prefix, weights in scored.items():
                if weights is None:
                    continue
                # The EMA's pass leaves torch's RNG as it was (a DataLoader draws its seed from it), so
                # --model-ema does not change the raw weights' run (dropout, drop-path).
                with torch.random.fork_rng(devices=[], enabled=prefix == "val_ema"):
                    acc = validate(weights, val_index, crop.res, mean, std, runtime,
                                   max(1, cfg.batch_size // info.world_size), cfg.workers, info, val_order, val_decoded)
                row[f"{prefix}_top1"], row[f"{prefix}_top5"] = acc["top1"], acc["top5"]
        improved = row["val_top1"] is not None and row["val_top1"] > state.best_top1
        state.epoch, state.metrics = epoch + 1, state.metrics + [row]
        state.best_top1 = row["val_top1"] if improved else state.best_top1
        extra = state.checkpoint_state(info)  # collective (RNG gather): every rank takes part
        if info.is_main:
            meta = dict(arch=cfg.arch, classes=classes, res=crop.res, mean=mean, std=std,
                        train_config=dataclasses.asdict(cfg), store_digest=mode.store_digest, **{RECORD_KEY: images})
            save_checkpoint(run / "last.pt", model=model, **meta, **extra)
            if improved:
                save_checkpoint(run / "best.pt", model=model, **meta, **extra)
            log.write(state.metrics, final=state.epoch == cfg.epochs)
        say(_summary(row, cfg.epochs, steps_per_rank, time.perf_counter() - started))
        info.barrier()
    return state.metrics


def check_finite(model: nn.Module, first_bad: int, epoch: int, steps: int, scheduler, run: Path,
                 info: DistInfo) -> None:
    """Stop a diverged run after the epoch it diverged in, before it is validated or saved: a
    non-finite model would be checkpointed, even as best.pt (argmax of NaN logits scores some top-1).
    ``first_bad``: this rank's first update with a non-finite loss, -1 if none. All ranks refuse together."""
    finite = all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())
    found = info.gather_object((first_bad, finite))
    bad = [u for u, _ in found if u >= 0]
    if not bad and all(ok for _, ok in found):
        return
    last = run / "last.pt"
    kept = (f"the last good checkpoint is {last} (after epoch {epoch - 1})" if epoch and last.is_file()
            else "no epoch finished before it, so nothing was saved")
    if bad:
        update = min(bad)
        what = (f"the loss is not finite (nan or inf) from step {update} (epoch {epoch}, step {update - epoch * steps} "
                f"of {steps}), at lr {scheduler._get_lr(update)[0]:.3g}")
    else:
        what = f"the student's weights or BatchNorm statistics are not finite after epoch {epoch}"
    raise MealV2Error(f"training diverged: {what}; epoch {epoch} was not saved and {kept}. Start a new run with a "
                      f"lower --lr (or --warmup-epochs); --resume would repeat the same steps")


def plan_text(cfg: TrainConfig, loader: TrainLoader, mode: Mode, info: DistInfo, scheduler) -> str:
    """What the run will do, in the units users plan in (printed at start; all of --dry-run)."""
    n, steps, crops = len(mode.index), len(loader), loader.crops_per_image
    passes = loader.passes(cfg.epochs)
    lines = [f"mealv2 train: {mode.name} labels, {cfg.arch} at {shown_res(mode.schedule)} px, {n} images x {crops} "
             f"crops per image; device {loader.device.type}",
             f"  {describe(loader.backend, loader.device.type, loader.workers)}",
             f"  batch: {loader.crops_per_step} crops per step globally (--batch-size) = {info.world_size} rank(s) x "
             f"{loader.images_per_step} images x {crops} crops",
             f"  epoch = {n} crops (one per image, as MEAL V2 and FKD count): {steps} steps of "
             f"{loader.crops_per_step} crops = {steps * loader.crops_per_step} crops; {cfg.epochs} epochs = "
             f"{cfg.epochs * steps} steps = {passes:.2f} passes over the images (a pass: each image with its "
             f"{crops} crops)"]
    turns = sorted({0, cfg.warmup_epochs, cfg.epochs - 1, *([] if cfg.cos else range(cfg.lr_step, cfg.epochs,
                                                                                     cfg.lr_step))} - {cfg.epochs})
    lrs = ", ".join(f"epoch {e}: {scheduler._get_lr(e * steps)[0]:.3g}" for e in turns if 0 <= e < cfg.epochs)
    lines.append(f"  lr ({'cosine' if cfg.cos else f'x0.1 every {cfg.lr_step} epochs'}"
                 f"{f', {cfg.warmup_epochs} warm-up epochs' if cfg.warmup_epochs else ''}): {lrs}")
    if mode.objective.hard_label_weight:
        a = mode.objective.hard_label_weight
        soft = "distillation" + (" + discriminator" if cfg.use_discriminator_loss else "")
        lines.append(f"  loss: {a:g} x cross-entropy on the dataset's labels + {1 - a:g} x ({soft}) "
                     f"(--hard-label-weight {a:g})")
    if cfg.model_ema:
        lines.append(f"  weight EMA (timm's ModelEmaV3): decay {cfg.model_ema_decay:g} per step, validated and "
                     f"checkpointed beside the raw weights (`mealv2 eval --ema` scores it)")
    return "\n".join(lines + mode.plan_lines(passes))


def _summary(row: dict, epochs: int, steps_per_rank: list[int], seconds: float) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"lr {row['lr']:.3g}", f"loss {row['loss']:.4f}"]
    if row["d_loss"] is not None:
        parts.append(f"d_loss {row['d_loss']:.4f}")
    if row["val_top1"] is not None:
        parts.append(f"val top1 {row['val_top1']:.2f} top5 {row['val_top5']:.2f}")
    if row["val_ema_top1"] is not None:
        parts.append(f"EMA top1 {row['val_ema_top1']:.2f} top5 {row['val_ema_top5']:.2f}")
    parts += [f"{row['img_per_s']:.0f} img/s", f"steps per rank {steps_per_rank}", f"{seconds:.1f}s"]
    return "  ".join(parts)


def _resume_checkpoint(run: Path, cfg: TrainConfig, mode: Mode, *, val_index: DatasetIndex | None, info: DistInfo,
                       say) -> dict:
    """RUN/last.pt, refused when this command would train differently from the run it continues, or on
    other images (run_data.py)."""
    path = run / "last.pt"
    if not path.is_file():
        raise MealV2Error(f"--resume: {path} does not exist; start the run without --resume")
    ckpt = load_checkpoint_file(path)
    ours = dataclasses.asdict(cfg)
    # A setting added after the run was made is the run's at its default (which keeps the old behaviour).
    saved = {**TRAIN_DEFAULTS, **current_settings(ckpt.get("train_config", {}))}
    check_run_data(ckpt, path, saved, mode.index, val_index, data_arg=cfg.data, val_arg=cfg.val, warn=info.is_main)
    may_change = RESUME_MAY_CHANGE | ({"epochs"} if not cfg.cos else set()) | {"res", *RESOLVED_ON_RESUME}
    diff = [f"{k}: the run has {saved.get(k)!r}, this command {ours[k]!r}"
            for k in ours if k not in may_change and saved.get(k) != ours[k]]
    # The run's schedule from its checkpoint: its final res is the one it recorded (checkpoints are at the final res).
    was = res_schedule(int(ckpt["res"]), int(saved.get("epochs", cfg.epochs)),
                       *(saved.get(k) for k in RESOLVED_ON_RESUME))
    if was != mode.schedule:
        diff.append(f"student resolution: the run has {_describe(was, cfg.epochs)}, this command "
                    f"{_describe(mode.schedule, cfg.epochs)}{mode.res_hint(was)}")
    diff += mode.resume_diffs(ckpt, say)
    if diff:
        raise MealV2Error(f"--resume {path}: this command differs from the run's settings, so it would not "
                          f"continue the run exactly:\n  " + "\n  ".join(diff)
                          + "\nRepeat the run's flags (they are in the checkpoint's train_config), or start "
                            "a new run with another --out")
    done = int(ckpt.get("epoch", 0))
    if cfg.epochs < done:   # it would record the shorter plan and train nothing
        raise MealV2Error(f"--epochs {cfg.epochs}: {path} has trained {done} epochs already; pass more than {done} "
                          f"to train on, or evaluate RUN/best.pt or last.pt as they are")
    if cfg.epochs == done and not cfg.dry_run:
        say(f"mealv2 train: {run} has trained all its {done} epochs; nothing to do (pass --epochs above {done} "
            f"to train on)")
    return ckpt


def _describe(schedule: ResSchedule, epochs: int) -> str:
    return (f"{schedule.final} px ({schedule.describe(epochs)})" if schedule.progressive
            else f"{schedule.final} px")
