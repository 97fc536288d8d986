"""ReplayLoader as a Python caller meets it: every argument checked at construction in the config's words,
the model read through its DDP / DataParallel / torch.compile wrappers, the rank's GPU under mp.spawn, one
live iterator, peeking, and states that are not its own refused (issue 27)."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.distributed as dist
from torch import nn

import mealv2
from mealv2.common.errors import MealV2Error
from mealv2.common.models import distributed
from mealv2.common.models.distributed import DistInfo, local_rank

NORM = {"mean": (0.5,) * 3, "std": (0.5,) * 3}


def loader(labelled, **kw) -> mealv2.ReplayLoader:
    kw = {"batch_size": 8, **NORM, "device": "cpu", "workers": 1, **kw}
    return mealv2.ReplayLoader(labelled.store, labelled.data, **kw)


@pytest.mark.parametrize("given, refusal", [
    ({"batch_size": 0}, "batch_size = 0 is out of range; expected an integer >= 1"),
    ({"batch_size": -8}, "batch_size = -8 is out of range; expected an integer >= 1"),
    ({"batch_size": 20.7}, "batch_size = 20.7 is not an integer; expected an integer >= 1"),
    ({"batch_size": "8"}, "batch_size = '8' is not an integer"),
    ({"batch_size": True}, "batch_size = True is not an integer"),
    ({"workers": 0}, "workers = 0 is out of range; expected an integer >= 1"),
    ({"seed": -1}, "seed = -1 is out of range; expected an integer >= 0"),
    ({"seed": 1.5}, "seed = 1.5 is not an integer"),
    ({"res": 0}, "res = 0 is out of range; expected an integer >= 1"),
    ({"res": 1.5}, "res = 1.5 is not an integer"),
    ({"mean": (math.nan,) * 3}, (r"mean = \(nan, nan, nan\) is not three finite numbers; expected three finite "
                                 r"numbers \(R, G, B\)")),
    ({"mean": (0.5, 0.5)}, r"mean = \(0.5, 0.5\) is not three numbers"),
    ({"std": (0, 0, 0)}, r"std = \(0, 0, 0\) is not positive; expected three finite numbers \(R, G, B\), each > 0"),
    ({"std": "0.5"}, "std = '0.5' is not three numbers"),
    ({"device": "gpu"}, "device = 'gpu' is not a choice; expected one of 'auto', 'cpu', 'cuda'"),
    ({"loader": "nope"}, "loader = 'nope' is not a choice; expected one of 'auto', 'dali'"),
    ({"hard_labels": "no"}, "hard_labels = 'no' is not a bool; expected True or False"),
    ({"crops_per_image": 0}, "crops_per_image = 0 is out of range"),
    ({"model": "resnet18"}, "model = 'resnet18' is not a Module"),
])
def test_every_argument_is_refused_at_construction_naming_it(labelled, given, refusal):
    with pytest.raises(MealV2Error, match=f"^ReplayLoader: {refusal}"):
        loader(labelled, **given)


def test_the_refusals_are_the_configs_words(labelled, tmp_path):
    """batch_size=0 is refused as TrainConfig (and so `mealv2 train --batch-size 0`) refuses it; a URL as DATA too."""
    for given in ({"batch_size": 0}, {"data": "s3://bucket/train"}):
        with pytest.raises(MealV2Error) as train:
            mealv2.TrainConfig(**{"data": str(labelled.data), "out": str(tmp_path / "run"), "arch": "test_resnet",
                                  "labels": str(labelled.store), **given})
        with pytest.raises(MealV2Error) as replay:
            mealv2.ReplayLoader(**{"store": labelled.store, "data": labelled.data, "batch_size": 8, **NORM, **given})
        assert str(replay.value).removeprefix("ReplayLoader: ") == str(train.value).removeprefix("train: ")


@pytest.fixture
def gloo_group(tmp_path):
    """A one-rank gloo process group, as a user's DDP loop joins it."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_wrapped_model_gives_its_own_normalisation_and_class_count(labelled, gloo_group):
    model = timm.create_model("test_resnet", num_classes=3)    # its mean/std are 0.5: not ImageNet's
    own = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    assert own == ((0.5,) * 3, (0.5,) * 3)
    wrapped = {"DDP": nn.parallel.DistributedDataParallel(model), "compiled DataParallel":
               torch.compile(nn.DataParallel(model)), "DataParallel of a compiled model":
               nn.DataParallel(torch.compile(model))}
    for name, wrapper in wrapped.items():
        replay = loader(labelled, model=wrapper, mean=None, std=None)
        assert (replay.mean, replay.std) == own, name
    five = timm.create_model("test_resnet", num_classes=5)
    with pytest.raises(MealV2Error, match=r"the model has 5 outputs, .* 3 classes"):
        loader(labelled, model=nn.parallel.DistributedDataParallel(five))


def test_a_model_without_a_data_config_needs_mean_and_std(labelled):
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(MealV2Error, match=r"^ReplayLoader: the model \(Sequential\) has no timm data config "
                                          r"\(pretrained_cfg\) .* pass mean= and std="):
        loader(labelled, model=nn.DataParallel(plain), mean=None, std=None)
    given = loader(labelled, model=plain, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    assert (given.mean, given.std) == ((0.4, 0.5, 0.6), (0.2, 0.25, 0.3))


def test_a_rank_without_local_rank_takes_the_gpu_of_its_group_rank(monkeypatch):
    """mp.spawn sets no LOCAL_RANK: rank r takes GPU r mod the visible GPUs, not cuda:0 for all."""
    assert [local_rank(r, {}, 4) for r in range(6)] == [0, 1, 2, 3, 0, 1]
    assert local_rank(5, {"LOCAL_RANK": "2"}, 4) == 2       # torchrun's word wins
    assert local_rank(5, {}, 0) == 0                        # no GPU: the rank's device is the CPU anyway
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 3)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 2)
    assert DistInfo.current() == DistInfo(rank=3, world_size=4, local_rank=1)


def test_one_live_iterator_per_loader(labelled):
    """Two live iterators would both replay step 0 while the step counter ran on: the second is refused."""
    straight = [images for images, _ in loader(labelled)]
    replay = loader(labelled)
    first = iter(replay)
    with pytest.raises(MealV2Error, match=r"^ReplayLoader: cannot iterate it again while an iterator over it is "
                                          r"live \(at step 0\); one iterator at a time"):
        iter(replay)                                        # one not yet started is live too
    images, _ = next(first)
    with pytest.raises(MealV2Error, match=r"cannot iterate it again .*\(at step 1\)"):
        next(iter(replay))
    with pytest.raises(MealV2Error, match="cannot load a state while an iterator over it is live"):
        replay.load_state_dict(replay.state_dict())
    del first                                               # dropped: the loader may be iterated again
    rest = [images for images, _ in replay]
    assert replay.step == len(replay) == 2 and len(rest) == 1
    torch.testing.assert_close(images, straight[0])
    torch.testing.assert_close(rest[0], straight[1])
    closed = iter(replay)
    closed.close()
    assert len(list(replay)) == 2                           # closed or exhausted ones are not live


def test_peeking_takes_a_step_and_the_documented_peek_does_not(labelled):
    replay = loader(labelled)
    peeked, _ = next(iter(replay))                          # a batch handed out is a step taken
    assert replay.step == 1
    replay.load_state_dict({**replay.state_dict(), "step": 0})
    state = replay.state_dict()                             # the docstring's peek: save, take one, restore
    again, _ = next(iter(replay))
    replay.load_state_dict(state)
    assert replay.step == 0
    first, _ = next(iter(replay))
    torch.testing.assert_close(peeked, again)
    torch.testing.assert_close(first, peeked)


@pytest.mark.parametrize("state, refusal", [
    (None, (r"None is not a ReplayLoader's state; expected what ReplayLoader.state_dict\(\) returns, a dict with "
            r"keys \['batch_size', 'num_images', 'seed', 'step', 'store', 'teacher_weights'\]")),
    ({"step": 3}, r"a dict with keys \['step'\] is not a ReplayLoader's state"),
    ({"state": {}, "param_groups": []}, r"a dict with keys \['param_groups', 'state'\] is not a ReplayLoader's"),
])
def test_what_is_not_a_loaders_state_is_refused(labelled, state, refusal):
    replay = loader(labelled)
    with pytest.raises(MealV2Error, match=f"^ReplayLoader.load_state_dict: {refusal}"):
        replay.load_state_dict(state)


@pytest.mark.parametrize("changed, refusal", [
    ({"step": -1}, r"step = -1 is out of range; expected an integer >= 0"),
    ({"step": 2.5}, r"step = 2.5 is not an integer"),
    ({"step": "3"}, r"step = '3' is not an integer"),
    ({"store": "0" * 64}, r"the saved state replays other crops.*\n  store: the saved loader has '0000"),
])
def test_a_loaders_state_with_a_bad_step_or_another_store_is_refused(labelled, changed, refusal):
    replay = loader(labelled)
    with pytest.raises(MealV2Error, match=f"^ReplayLoader.load_state_dict: {refusal}"):
        replay.load_state_dict({**replay.state_dict(), **changed})
    assert replay.step == 0
