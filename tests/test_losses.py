import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from mealv2.stage2_train.losses import (Discriminator, Mix, discriminator_loss, draw_mix, mix_images, mix_targets,
                                        soft_cross_entropy)
from mealv2.stage2_train.trainer import TrainState, train_step


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


def test_discriminator_loss_labels_student_fake_and_target_real():
    torch.manual_seed(0)
    d = Discriminator(8)
    logits, target = torch.randn(5, 8), soft_targets(5, 8)
    scores = d(torch.cat([F.log_softmax(logits, 1), target.log()]))
    labels = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5)
    torch.testing.assert_close(discriminator_loss(d, logits, target),
                               F.binary_cross_entropy_with_logits(scores, labels))


@pytest.mark.parametrize("d_lr", [0.1, 0.0])
def test_discriminator_steps_with_its_own_optimizer(d_lr):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4)
    disc = Discriminator(4)
    state = TrainState(model=model, forward=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       disc=disc, d_optimizer=torch.optim.SGD(disc.parameters(), lr=d_lr, momentum=0.9))
    before = {k: v.clone() for k, v in disc.state_dict().items()}
    student_before = [p.clone() for p in model.parameters()]
    loss, d_loss = train_step(state, torch.randn(8, 3, 32, 32), soft_targets(8, 4))
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
