import io

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from mealv2.common.data.targets import encode_topk, reconstruct_targets
from mealv2.common.errors import MealV2Error
from mealv2.common.models.runtime import Runtime
from mealv2.stage2_train.losses import (Discriminator, MealV2Loss, Mix, discriminator_loss, draw_mix, mix_images,
                                        mix_targets, soft_cross_entropy, topk_form)
from mealv2.stage2_train.trainer import Objective, TrainState, train_step

CPU = Runtime(torch.device("cpu"))


def soft_targets(n, k, seed=0):
    return torch.softmax(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 3, dim=1)


def test_soft_cross_entropy_is_meal_v2_kl_loss():
    logits, target = torch.randn(6, 5), soft_targets(6, 5)
    expected = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(soft_cross_entropy(logits, target), expected)
    # KL differs by the target's entropy only: same gradient
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    torch.testing.assert_close(soft_cross_entropy(logits, labels), F.cross_entropy(logits, labels))


@pytest.mark.parametrize("classes, widths", [(1000, [125, 15, 2]), (3, [1, 1, 2]), (100, [12, 1, 2])])
def test_discriminator_is_three_1x1_convs(classes, widths):
    d = Discriminator(classes)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == widths
    assert all(c.kernel_size == (1, 1) for c in convs)
    assert d(torch.randn(4, classes)).shape == (4, 2)


def test_temperature_divides_the_students_logits_and_scales_the_loss_by_t_squared():
    """Against the teachers' softmax(z / T), a student with the teachers' logits z is at the
    optimum (zero gradient), and at large T the gradient's size does not shrink like 1 / T^2."""
    torch.manual_seed(0)
    z = torch.randn(8, 10) * 3
    noise = torch.randn(8, 10)
    grads = {}
    for t in (1.0, 2.0, 16.0, 32.0):
        at_optimum = z.clone().requires_grad_()
        soft_cross_entropy(at_optimum, torch.softmax(z / t, 1), t).backward()
        assert at_optimum.grad.abs().max() < 1e-6, t
        off = (z + noise).requires_grad_()
        soft_cross_entropy(off, torch.softmax(z / t, 1), t).backward()
        grads[t] = off.grad.norm().item()
    assert grads[32.0] == pytest.approx(grads[16.0], rel=0.1)   # unscaled: a quarter


def _train_discriminator(student: torch.Tensor, target: torch.Tensor, topk, steps: int = 300) -> float:
    """Train a discriminator alone on fixed inputs; the loss it ends at."""
    torch.manual_seed(0)
    disc = Discriminator(student.shape[1])
    opt = torch.optim.Adam(disc.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = discriminator_loss(disc, student, target, topk=topk)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return discriminator_loss(disc, student, target, topk=topk).item()


def test_discriminator_cannot_tell_a_student_from_its_stored_target_by_the_flat_tail():
    """A stored target's tail is flat; a student with the same top-k and leftover mass is not.
    Reduced to the same form the two are one input: the best a discriminator can do is ln 2.
    Fed the raw distributions, it separates them by the tail alone and its loss falls toward 0."""
    torch.manual_seed(0)
    k, classes = 5, 128
    logits = torch.randn(32, classes) * 4
    ids, codes = encode_topk(torch.softmax(logits, 1), k)
    target = reconstruct_targets(ids, codes, classes)       # what a store gives back
    # a student distribution with exactly the target's top-k, and an uneven tail of the same mass
    tail = (0.2 + 1.6 * torch.rand(32, classes)).scatter(1, ids, 0.0)
    tail = tail / tail.sum(1, keepdim=True) * (1 - target.gather(1, ids).sum(1, keepdim=True))
    student = tail.scatter(1, ids, target.gather(1, ids)).log()   # logits whose softmax is that
    torch.testing.assert_close(topk_form(torch.softmax(student, 1), k), target)
    assert _train_discriminator(student, target, topk=k) == pytest.approx(np.log(2), abs=1e-3)
    assert _train_discriminator(student, target, topk=None) < 0.6          # ln 2 = 0.693


def test_topk_form_keeps_the_top_k_and_spreads_the_rest():
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.06, 0.04]], requires_grad=True)
    q = topk_form(p, 2)
    torch.testing.assert_close(q, torch.tensor([[0.5, 0.2, 0.075, 0.075, 0.075, 0.075]]))
    q[0, 2].backward()                                           # the spread mass depends on the top-k
    torch.testing.assert_close(p.grad, torch.tensor([[-0.25, -0.25, 0, 0, 0, 0]]))


@pytest.mark.parametrize("d_lr", [0.1, 0.0])
def test_discriminator_steps_with_its_own_optimizer(d_lr):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4)
    disc = Discriminator(4)
    state = TrainState(model=model, forward=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       disc=disc, d_optimizer=torch.optim.SGD(disc.parameters(), lr=d_lr, momentum=0.9))
    before = {k: v.clone() for k, v in disc.state_dict().items()}
    student_before = [p.clone() for p in model.parameters()]
    loss, d_loss = train_step(state, torch.randn(8, 3, 32, 32), soft_targets(8, 4), CPU, Objective(topk=2))
    assert torch.isfinite(loss) and torch.isfinite(d_loss)
    changed = [not torch.equal(before[k], v) for k, v in disc.state_dict().items()]
    # the discriminator moves exactly when its own optimizer has a learning rate
    assert all(changed) if d_lr else not any(changed)
    assert all(p.grad is not None for p in disc.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(student_before, model.parameters()))


def crops_with_ids(n, res=16):
    """Crop i filled with the value i, so a pixel says which crop it came from."""
    return torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, res, res).clone()


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_target_is_the_area_weighted_mix(seed):
    n, k, shift, res = 8, 6, 2, 32
    mix = draw_mix(np.random.default_rng(seed), cutmix_alpha=1.0, cutmix_prob=1.0, mixup_alpha=0.0, shift=shift)
    assert mix.box is not None
    images, lam = mix_images(mix, crops_with_ids(n, res))
    ids = torch.arange(n, dtype=torch.float32)[:, None, None, None]
    own = (images == ids).float().mean(dim=(1, 2, 3))
    other = (images == ids.roll(shift, dims=0)).float().mean(dim=(1, 2, 3))
    torch.testing.assert_close(own, torch.full((n,), lam))           # lam = area each crop keeps
    torch.testing.assert_close(other, torch.full((n,), 1 - lam))     # the rest from crop i - shift
    assert abs(lam - mix.lam) < 4 / res                              # pixel rounding only
    target = soft_targets(n, k, seed)
    mixed = mix_targets(mix, lam, target, k)
    torch.testing.assert_close(mixed.sum(dim=1), torch.ones(n))
    torch.testing.assert_close(mixed, lam * target + (1 - lam) * target.roll(shift, dims=0))


def test_mixup_target_is_the_weighted_mix_and_hard_labels_become_one_hot():
    mix = draw_mix(np.random.default_rng(3), cutmix_alpha=0.0, cutmix_prob=1.0, mixup_alpha=0.4, shift=1)
    assert mix.box is None and 0 <= mix.lam <= 1
    x = torch.randn(4, 3, 8, 8)
    images, lam = mix_images(mix, x)
    assert lam == mix.lam
    torch.testing.assert_close(images, lam * x + (1 - lam) * x.roll(1, dims=0))
    labels = torch.tensor([0, 1, 2, 2])
    mixed = mix_targets(mix, lam, labels, 3)
    torch.testing.assert_close(mixed.sum(dim=1), torch.ones(4))
    expected = lam * F.one_hot(labels, 3).float() + (1 - lam) * F.one_hot(labels.roll(1), 3).float()
    torch.testing.assert_close(mixed, expected)


def test_draw_mix_is_a_pure_function_of_the_generator():
    draws = lambda s: draw_mix(np.random.default_rng(s), 1.0, 0.5, 0.2, shift=4)  # noqa: E731
    assert [draws(s) for s in range(20)] == [draws(s) for s in range(20)]
    kinds = {draws(s).box is None for s in range(20)}
    assert kinds == {True, False}   # cutmix-prob 0.5: some steps CutMix, the others mixup
    assert draw_mix(np.random.default_rng(0), 0.0, 1.0, 0.0) is None
    assert Mix(lam=0.5).shift == 1


def test_with_stored_targets_the_discriminator_loss_does_not_collapse_in_a_short_run():
    """A student distilled from a store's top-k targets, discriminator on. Judging the same form,
    the discriminator's loss stays near ln 2 while the distillation loss falls; fed the raw
    distributions it tells them apart by the stored targets' flat tail within 50 steps."""
    classes, k, steps = 64, 5, 75
    g = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 32, 32, generator=g)
    torch.manual_seed(1)
    teacher = timm.create_model("test_resnet", num_classes=classes).eval()
    with torch.no_grad():
        z = teacher(images)
    ids, codes = encode_topk(torch.softmax(z / z.std() * 3, 1), k)
    targets = reconstruct_targets(ids, codes, classes)
    runs = {}
    for topk in (None, k):
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", num_classes=classes)
        disc = Discriminator(classes)
        state = TrainState(model=model, forward=model,
                           optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), disc=disc,
                           d_optimizer=torch.optim.SGD(disc.parameters(), lr=0.05, momentum=0.9))
        runs[topk] = [tuple(v.item() for v in train_step(state, images[i:i + 16], targets[i:i + 16], CPU,
                                                          Objective(topk=topk)))
                      for i in (16 * (s % 4) for s in range(steps))]
    loss, d_loss = zip(*runs[k])
    assert np.mean(loss[-10:]) < np.mean(loss[:10]) - 0.5            # the student learns
    assert min(d_loss[50:]) > 0.6                                     # ln 2 = 0.693
    assert max(d for _, d in runs[None][50:]) < 0.3                   # the shortcut


def _trained_loss(seed: int = 0) -> MealV2Loss:
    """A loss whose discriminator optimizer has taken a step (momentum buffers to save)."""
    torch.manual_seed(seed)
    loss = MealV2Loss(3, temperature=2.0, topk=2, discriminator=True)
    loss(torch.randn(8, 3, requires_grad=True), soft_targets(8, 3)).backward()
    loss.step()
    return loss


def _assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        torch.testing.assert_close(sa["state"][i]["momentum_buffer"], sb["state"][i]["momentum_buffer"], rtol=0, atol=0)


def test_a_module_holding_the_loss_saves_and_restores_its_discriminator_optimizer():
    parent = nn.Module()
    parent.criterion = _trained_loss()
    saved = io.BytesIO()
    torch.save(parent.state_dict(), saved)
    assert "criterion._extra_state" in parent.state_dict()
    restored = nn.Module()
    restored.criterion = MealV2Loss(3, temperature=2.0, topk=2, discriminator=True)
    restored.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    _assert_same_optimizer(restored.criterion.d_optimizer, parent.criterion.d_optimizer)
    with pytest.raises(MealV2Error, match="the state was saved with a discriminator .*, this loss has none"):
        restored.criterion = MealV2Loss(3, temperature=2.0, topk=2)
        restored.load_state_dict(parent.state_dict())


def test_a_loss_state_saved_before_the_prefix_still_loads_or_is_refused_naming_why():
    loss = _trained_loss()
    old = {k: v for k, v in loss.state_dict().items() if k != "_extra_state"}
    old["d_optimizer"] = loss.d_optimizer.state_dict()       # how MealV2Loss.state_dict() saved it before
    again = MealV2Loss(3, temperature=2.0, topk=2, discriminator=True)
    again.load_state_dict(old)
    _assert_same_optimizer(again.d_optimizer, loss.d_optimizer)
    MealV2Loss(3).load_state_dict({})                        # no discriminator: it saved nothing, and loads so
    parent = nn.Module()
    parent.criterion = MealV2Loss(3, temperature=2.0, topk=2, discriminator=True)
    old_parent = {**{f"criterion.{k}": v for k, v in old.items() if k != "d_optimizer"},
                  "d_optimizer": old["d_optimizer"]}
    with pytest.raises(MealV2Error, match=r"no discriminator optimizer \('criterion._extra_state'\).*strict=False"):
        parent.load_state_dict(old_parent)                   # a parent's state from then: its key unprefixed
