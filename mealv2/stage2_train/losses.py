"""MEAL V2's loss: soft cross-entropy against the teachers' averaged softmax, plus an optional
discriminator on the final outputs, and optionally the dataset's hard labels weighed in beside
them; and the CutMix/mixup that mix crops and their targets.

:class:`MealV2Loss` is the objective as a module for a user's own loop (the public API);
``mealv2 train`` computes the same terms through :func:`objective_losses`.

Mixing is split into pure functions: :func:`draw_mix` draws what to do from a generator,
:func:`mix_images` applies it to any number of views (relative box, so views of any
resolution are cut alike) and :func:`mix_targets` mixes the targets by the same weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..common.config import Number
from ..common.errors import MealV2Error, require_finite
from ..common.models.distributed import DistInfo


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """-sum(target * log_softmax(logits / T)) * T^2, batch mean: MEAL V2's "KLLoss" (KL up to the
    target's entropy, a constant), with Hinton's temperature: the target is the teachers'
    softmax(z / T), so the student's logits are divided by T too and the loss is scaled by T^2
    to keep its gradients' size independent of T. Integer targets give plain cross-entropy
    (``--hard-labels``; T must be 1)."""
    if temperature == 1.0:
        return F.cross_entropy(logits.float(), target)
    return F.cross_entropy(logits.float() / temperature, target) * temperature ** 2


def topk_form(probs: torch.Tensor, k: int) -> torch.Tensor:
    """``probs`` reduced to a stored target's form: its own top-k kept, the rest of the mass
    spread evenly over the other classes. Differentiable in the kept and the spread mass."""
    num_classes = probs.shape[1]
    if k >= num_classes:
        return probs
    top, ids = probs.topk(k, dim=1)
    rest = (1 - top.sum(dim=1, keepdim=True)).clamp_min(0) / (num_classes - k)
    return rest.expand(-1, num_classes).scatter(1, ids, top)


class Discriminator(nn.Module):
    """MEAL V2's discriminator on final outputs: 1x1 convs C -> C/8 -> C/64 -> 2.

    Widths are floored at 1 so tiny class counts work. ReLU sits between the convs only:
    the original also applies one to its two output logits, which pins them at >= 0 and
    leaves no gradient once both reach 0.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        c1, c2 = max(num_classes // 8, 1), max(num_classes // 64, 1)
        self.net = nn.Sequential(nn.Conv2d(num_classes, c1, 1), nn.ReLU(inplace=True),
                                 nn.Conv2d(c1, c2, 1), nn.ReLU(inplace=True), nn.Conv2d(c2, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, :, None, None]).flatten(1)


def discriminator_loss(disc: Discriminator, logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0,
                       topk: int | None = None) -> torch.Tensor:
    """BCE-with-logits of ``disc`` telling the student ([1, 0]) from the teachers ([0, 1]).

    Both sides enter as logits: a store keeps probabilities, and their logs are logits up to a
    per-row shift, which is removed by centring each row (as raw log-probabilities, around -7 for
    1000 classes, they leave most of the discriminator's ReLUs dead). The student's is its
    softmax(logits / T), the teachers' the target. With stored targets (``topk``: the store's k) both are first reduced to the same
    form, top-k plus the rest spread evenly (:func:`topk_form`): a stored target's tail is
    exactly flat and a student's is not, so otherwise the discriminator tells them apart from
    the tail alone, its loss falls to 0 and it teaches nothing.
    As in MEAL V2 this is *added* to the distillation loss and the sum is minimised by student
    and discriminator alike (no min-max game); the trainer steps the discriminator with its own
    optimizer on that sum's gradients.
    """
    fake = F.softmax(logits.float() / temperature, dim=1)
    real = target
    if topk is not None:
        fake, real = topk_form(fake, topk), topk_form(target, topk)
    logp = torch.cat([fake, real]).clamp_min(1e-8).log()
    scores = disc(logp - logp.mean(dim=1, keepdim=True))
    labels = torch.zeros_like(scores)
    labels[: len(fake), 0] = 1
    labels[len(fake):, 1] = 1
    return F.binary_cross_entropy_with_logits(scores, labels)


def objective_losses(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0,
                     disc: nn.Module | None = None, topk: int | None = None, *, labels: torch.Tensor | None = None,
                     hard_label_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, discriminator loss or None): the two terms of the objective, minimised as their sum.

    MEAL V2's are the distillation loss and the discriminator's BCE. A hard-label weight A > 0
    moves weight from that distillation side to the dataset's labels, as timm's and torchdistill's
    distillation tasks weigh a task loss beside theirs: loss = A * CE(labels) + (1 - A) * KD, and
    the discriminator's term is weighted (1 - A) too (it also pulls the student toward the
    teachers' outputs), so A = 1 trains on the labels alone. The labels' CE is at T = 1, on the
    plain logits. Integer targets (dataset labels) take plain cross-entropy, at T = 1.

    Args:
        labels: the crops' class ids (n,), or their mixed one-hot rows (n, K) after CutMix/mixup;
            required when ``hard_label_weight`` > 0.
        hard_label_weight: A in [0, 1]; 0 is MEAL V2.
    """
    t = temperature if target.is_floating_point() else 1.0
    loss = soft_cross_entropy(logits, target, t)
    d_loss = discriminator_loss(disc, logits, target, t, topk) if disc is not None else None
    if not hard_label_weight:
        return loss, d_loss
    if labels is None:
        raise MealV2Error(f"hard_label_weight {hard_label_weight:g} weighs the dataset's labels in, but no labels "
                          f"were given: pass the crops' labels (ReplayLoader(..., hard_labels=True) yields them)")
    soft_side = 1.0 - hard_label_weight
    loss = hard_label_weight * soft_cross_entropy(logits, labels) + soft_side * loss
    return loss, None if d_loss is None else soft_side * d_loss


class MealV2Loss(nn.Module):
    """MEAL V2's objective: KD against the soft targets at temperature T, plus (optionally) the
    discriminator's BCE, as ``mealv2 train`` (``--use-discriminator-loss``) trains with it; and
    optionally the dataset's hard labels beside them (``--hard-label-weight``).

    ``loss = criterion(logits, targets)`` (``criterion(logits, targets, labels)`` with a hard-label
    weight) returns the sum to backpropagate; after the student's optimizer step, :meth:`step`
    applies the discriminator's gradients with its own SGD (momentum 0.9, constant lr; averaged
    over the ranks under torch.distributed). ``kd_loss`` and ``d_loss`` hold the last step's two
    terms as summed (``metrics.csv``'s loss and d_loss), detached, for logging. Its ``state_dict``
    includes that optimizer's, under its own prefix, so a module holding the loss saves and restores it.

    Args:
        num_classes: the targets' classes (``loader.num_classes``).
        temperature: the targets' softmax temperature (``loader.temperature``): the student's
            logits are divided by it and the loss scaled by T^2.
        topk: the store's k (``loader.topk``): the discriminator compares student and targets in
            the store's top-k form; None for full targets.
        discriminator: add MEAL V2's discriminator term.
        d_lr: the discriminator's learning rate (``--d-lr``).
        hard_label_weight: A in [0, 1] (``--hard-label-weight``): loss = A * CE(labels) + (1 - A) *
            (KD + the discriminator's term); 0 is MEAL V2. For teachers not much stronger than
            the student, or few images (README, "Hard labels beside the soft targets").

    Example::

        criterion = mealv2.MealV2Loss(loader.num_classes, temperature=loader.temperature, topk=loader.topk,
                                      discriminator=True).to(loader.device)
        loss = criterion(model(images), targets)
        optimizer.zero_grad(); loss.backward(); optimizer.step(); criterion.step()
    """

    def __init__(self, num_classes: int, *, temperature: float = 1.0, topk: int | None = None,
                 discriminator: bool = False, d_lr: float = 0.01, hard_label_weight: float = 0.0):
        super().__init__()
        require_finite("MealV2Loss", temperature=temperature, d_lr=d_lr, hard_label_weight=hard_label_weight)
        if temperature <= 0:
            raise MealV2Error(f"MealV2Loss: temperature = {temperature!r}; expected a positive temperature "
                              f"(the store's: loader.temperature)")
        if refusal := Number(float, 0, 1).refusal(hard_label_weight):
            raise MealV2Error(f"MealV2Loss: hard_label_weight = {refusal}")
        self.temperature, self.topk, self.hard_label_weight = temperature, topk, hard_label_weight
        self.discriminator = Discriminator(num_classes) if discriminator else None
        self.d_optimizer = (torch.optim.SGD(self.discriminator.parameters(), lr=d_lr, momentum=0.9)
                            if discriminator else None)
        self.kd_loss: torch.Tensor | None = None
        self.d_loss: torch.Tensor | None = None
        self.register_load_state_dict_pre_hook(_read_older_state)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of a batch: ``labels`` are the crops' class ids (or their mixed one-hot rows),
        which a hard-label weight needs."""
        loss, d_loss = objective_losses(logits, target, self.temperature, self.discriminator, self.topk,
                                        labels=labels, hard_label_weight=self.hard_label_weight)
        self.kd_loss, self.d_loss = loss.detach(), None if d_loss is None else d_loss.detach()
        return loss if d_loss is None else loss + d_loss

    def step(self) -> None:
        """The discriminator's optimizer step on the last backward's gradients (nothing without one)."""
        if self.d_optimizer is None:
            return
        DistInfo.current().average_gradients(self.discriminator)
        self.d_optimizer.step()
        self.d_optimizer.zero_grad(set_to_none=True)

    def get_extra_state(self) -> dict:
        """The discriminator's optimizer state, saved as ``_extra_state`` under the module's own prefix, so a
        parent module's ``state_dict()``/``load_state_dict()`` carries it too (``criterion._extra_state``)."""
        return {"d_optimizer": None if self.d_optimizer is None else self.d_optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        saved = state.get("d_optimizer") if isinstance(state, dict) else None
        if (saved is None) != (self.d_optimizer is None):
            raise MealV2Error(f"MealV2Loss.load_state_dict: the state was saved "
                              f"{'without' if saved is None else 'with'} a discriminator (discriminator=True), this "
                              f"loss has {'one' if saved is None else 'none'}; build the loss as the saved one was "
                              f"built")
        if saved is not None:
            self.d_optimizer.load_state_dict(saved)


def _read_older_state(loss: MealV2Loss, state_dict: dict, prefix: str, local_metadata, strict: bool, *_) -> None:
    """Read a MealV2Loss state saved before its optimizer moved under ``_extra_state``: it was
    ``d_optimizer`` beside the weights, and nothing without a discriminator. A parent module's state
    from then has it unprefixed at its top, out of the loss's reach: refused when strict, naming why."""
    key = prefix + "_extra_state"
    if key in state_dict:
        return
    if prefix + "d_optimizer" in state_dict:
        state_dict[key] = {"d_optimizer": state_dict.pop(prefix + "d_optimizer")}
    elif loss.d_optimizer is None:
        state_dict[key] = {"d_optimizer": None}
    elif strict:
        raise MealV2Error(f"MealV2Loss.load_state_dict: the saved state has no discriminator optimizer ({key!r}): "
                          f"it was saved without discriminator=True, or from a module holding the loss by a mealv2 "
                          f"that left the optimizer at the state's top; build the loss as it was saved, or load "
                          f"with strict=False to start the discriminator's optimizer afresh")


@dataclass(frozen=True)
class Mix:
    """One step's mixing: sample i is mixed with sample i - shift (``torch.roll`` pairing).

    The trainer shifts by the crops per image, so a crop is mixed with a crop of another image.
    """

    lam: float                                         # weight of the sample's own image
    shift: int = 1
    box: tuple[float, float, float, float] | None = None  # CutMix: relative (y0, x0, y1, x1) pasted in


def draw_mix(rng: np.random.Generator, cutmix_alpha: float, cutmix_prob: float, mixup_alpha: float,
             shift: int = 1) -> Mix | None:
    """CutMix with probability ``cutmix_prob`` (if alpha > 0), else mixup (if alpha > 0), else None.

    The CutMix box has area 1 - lam, lam ~ Beta(alpha, alpha), centred uniformly and clipped
    to the image, as in the CutMix paper and MEAL V2's ``--w-cutmix``.
    """
    if cutmix_alpha > 0 and rng.random() < cutmix_prob:
        cut = np.sqrt(1.0 - rng.beta(cutmix_alpha, cutmix_alpha))
        cy, cx = rng.random(2)
        y0, y1 = np.clip([cy - cut / 2, cy + cut / 2], 0, 1)
        x0, x1 = np.clip([cx - cut / 2, cx + cut / 2], 0, 1)
        box = (float(y0), float(x0), float(y1), float(x1))
        return Mix(lam=float(1 - (y1 - y0) * (x1 - x0)), shift=shift, box=box)
    if mixup_alpha > 0:
        return Mix(lam=float(rng.beta(mixup_alpha, mixup_alpha)), shift=shift)
    return None


def draw_step_mix(seed: int, step: int, rank: int, shift: int, cutmix_alpha: float, cutmix_prob: float,
                  mixup_alpha: float) -> Mix | None:
    """:func:`draw_mix` of a global step on a rank: a pure function of (seed, step, rank), so a
    resumed run, and a user's loop with the same settings, draw what ``mealv2 train`` draws."""
    return draw_mix(np.random.default_rng([seed, step, rank]), cutmix_alpha, cutmix_prob, mixup_alpha, shift=shift)


def mix_batch(images: torch.Tensor, *targets: torch.Tensor, seed: int, step: int, rank: int = 0, shift: int = 1,
              cutmix_alpha: float = 0.0, cutmix_prob: float = 1.0, mixup_alpha: float = 0.0,
              num_classes: int | None = None) -> tuple[torch.Tensor, ...]:
    """CutMix or mixup of a batch and its targets (soft, or class ids made one-hot), as ``mealv2
    train`` mixes stored targets: crop i is mixed with crop i - ``shift``, the targets by the area
    (or weight) each crop keeps. Returns ``(images, *targets)``, unchanged at a step that draws no
    mixing; give the soft targets and the hard labels together to mix both by the same draw.

    Args:
        images: (n, 3, res, res).
        targets: each (n, K) soft targets, or (n,) class ids (made one-hot: K is a soft target's,
            else ``num_classes``).
        seed, step, rank: what the draw is a function of (``--seed``, the global step, the rank).
        shift: the pairing; the crops per image, so a crop is mixed with another image's crop.
        cutmix_alpha: CutMix's Beta(alpha, alpha); 0 turns CutMix off.
        cutmix_prob: the probability of CutMix at a step (else mixup, if on).
        mixup_alpha: mixup's Beta(alpha, alpha); 0 turns mixup off.
        num_classes: the class count of integer targets, when no soft target gives it.

    Example::

        images, targets = mealv2.mix_batch(images, targets, seed=0, step=step, shift=2, cutmix_alpha=1.0)
        images, targets, labels = mealv2.mix_batch(images, targets, labels, seed=0, step=step, shift=2, mixup_alpha=0.2)
    """
    require_finite("mix_batch", cutmix_alpha=cutmix_alpha, cutmix_prob=cutmix_prob, mixup_alpha=mixup_alpha)
    if (cutmix_alpha > 0 or mixup_alpha > 0) and len(images) <= shift:
        raise MealV2Error(f"mix_batch: {len(images)} crops paired at shift {shift} mixes every crop with itself "
                          f"(one image per step on this rank); use a batch of at least 2 images per rank")
    classes = num_classes or next((t.shape[1] for t in targets if t.is_floating_point()), None)
    if classes is None and targets:
        raise MealV2Error("mix_batch: integer targets (class ids) need num_classes= to become one-hot")
    mix = draw_step_mix(seed, step, rank, shift, cutmix_alpha, cutmix_prob, mixup_alpha)
    if mix is None:
        return (images, *targets)
    images, lam = mix_images(mix, images)
    return (images, *(mix_targets(mix, lam, t, classes) for t in targets))


def _pixel_box(box, res: int) -> tuple[int, int, int, int]:
    return tuple(int(round(v * res)) for v in box)


def mix_images(mix: Mix, images: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mixed images (n, 3, res, res) and the weight of each sample's own image in them.

    For CutMix that weight is the pixel area actually kept, which rounding makes differ
    slightly from ``mix.lam``; targets must be mixed with the returned weight.
    """
    other = images.roll(mix.shift, dims=0)
    if mix.box is None:
        return mix.lam * images + (1 - mix.lam) * other, mix.lam
    res = images.shape[-1]
    y0, x0, y1, x1 = _pixel_box(mix.box, res)
    out = images.clone()
    out[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
    return out, 1.0 - (y1 - y0) * (x1 - x0) / res**2


def mix_targets(mix: Mix, lam: float, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """lam * own target + (1 - lam) * the paired sample's; class ids become one-hot first."""
    if not target.is_floating_point():
        target = F.one_hot(target, num_classes).float()
    return lam * target + (1 - lam) * target.roll(mix.shift, dims=0)
