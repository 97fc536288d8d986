import shutil

import numpy as np
import pytest
import timm
import torch

from mealv2.common.crop_loader import View
from mealv2.common.crops import CropParams, sample_crops
from mealv2.common.dataset import build_index
from mealv2.common.errors import MealV2Error
from mealv2.common.store import LabelStore
from mealv2.common.targets import reconstruct_targets
from mealv2.stage1_label.labeler import LabelConfig, run_label
from mealv2.stage2_train.loader import FreshLabels, StoredLabels, TrainLoader, epoch_order

CPU = torch.device("cpu")
VIEW = View(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def store(tiny_data, tmp_path_factory):
    """Two rounds of 3 crops per image of tiny_data, labelled by a random test_resnet."""
    work = tmp_path_factory.mktemp("loader_store")
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), work / "t.pth")
    return run_label(LabelConfig(data=str(tiny_data), teachers=[f"test_resnet={work / 't.pth'}@32"],
                                 out=str(work / "store"), rounds=2, crops_per_image=3, crop=CropParams(res=32),
                                 topk=2, batch_size=12, workers=2, device="cpu", progress=False))


@pytest.mark.parametrize("n, per_step, world", [(12, 4, 1), (12, 5, 1), (13, 2, 2), (3, 4, 2)])
def test_epoch_order_gives_every_rank_equal_full_steps(n, per_step, world):
    ranks = [epoch_order(n, per_step, seed=1, epoch=0, rank=r, world_size=world) for r in range(world)]
    assert len({r.shape for r in ranks}) == 1 and ranks[0].shape[1] == per_step
    seen = np.concatenate([r.reshape(-1) for r in ranks])
    assert set(seen) == set(range(n))                  # every image, padding only repeats some
    assert len(seen) - n < per_step * world            # less than one step of padding
    np.testing.assert_array_equal(ranks[0], epoch_order(n, per_step, seed=1, epoch=0, rank=0, world_size=world))


def test_epoch_order_changes_with_epoch_and_seed():
    a = epoch_order(100, 10, seed=0, epoch=0)
    assert not np.array_equal(a, epoch_order(100, 10, seed=0, epoch=1))
    assert not np.array_equal(a, epoch_order(100, 10, seed=1, epoch=0))
    assert sorted(a.reshape(-1)) == list(range(100))


def test_stored_labels_replay_round_e_mod_r(store, tiny_data):
    index = build_index(tiny_data)
    labels = StoredLabels(store)
    rounds = [store.read_round(r) for r in range(2)]
    ids = np.array([5, 0, 7])
    for epoch in range(4):
        boxes, flips = labels.for_epoch(epoch).crops(ids)
        np.testing.assert_array_equal(boxes, rounds[epoch % 2].boxes[ids])
        np.testing.assert_array_equal(flips, rounds[epoch % 2].flips[ids].astype(bool))
    loader = TrainLoader(index, labels, [VIEW], images_per_step=4, seed=0, device=CPU, workers=2)
    assert len(loader) == 3
    batches = list(loader(1))
    assert len(batches) == 3
    for batch in batches:
        assert batch.images.shape == (12, 3, 32, 32)
        torch.testing.assert_close(batch.target.sum(dim=1), torch.ones(12))
    # the first batch holds the first step's images, C crops each, image-major, with their stored targets
    first = loader.order(1)[0]
    data = rounds[1]
    expected = reconstruct_targets(torch.from_numpy(data.ids[first].astype(np.int64)).flatten(0, 1),
                                   torch.from_numpy(data.probs[first]).flatten(0, 1), 3)
    torch.testing.assert_close(batches[0].target, expected)


def test_dali_and_torch_loaders_agree(store, tiny_data):
    index = build_index(tiny_data)
    views = [VIEW, View(24, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    out = {}
    for backend in ("dali", "torch"):
        loader = TrainLoader(index, StoredLabels(store), views, images_per_step=4, seed=3, device=CPU,
                             backend=backend, workers=2)
        out[backend] = list(loader(0))
    assert len(out["dali"]) == len(out["torch"]) == 3
    for dali, tv in zip(out["dali"], out["torch"]):
        torch.testing.assert_close(dali.target, tv.target, rtol=0, atol=0)   # identical targets
        for a, b, view in zip(dali.views, tv.views, views):
            assert a.shape == b.shape == (12, 3, view.res, view.res)
            # same crops up to resampling differences (measured ~0.4/255 mean abs difference here)
            diff = ((a - b).abs() * torch.tensor(view.std)[:, None, None]).mean()
            assert diff < 2 / 255, f"view {view.res}px: mean abs pixel difference {diff * 255:.2f}/255"


def test_fresh_labels_draw_new_crops_each_epoch_with_dataset_labels(tiny_data):
    index = build_index(tiny_data)
    params = CropParams(res=32)
    labels = FreshLabels(seed=7, sizes=index.sizes, crops_per_image=2, params=params, labels=index.labels)
    ids = np.array([3, 1])
    for epoch in (0, 1):
        boxes, flips = labels.for_epoch(epoch).crops(ids)
        expected = sample_crops(7, epoch, ids, index.sizes[ids], 2, params)
        np.testing.assert_array_equal(boxes, expected[0])
        np.testing.assert_array_equal(flips, expected[1])
    assert not np.array_equal(labels.for_epoch(0).crops(ids)[0], labels.for_epoch(1).crops(ids)[0])
    target = labels.for_epoch(0).targets(ids, CPU)
    assert target.tolist() == np.repeat(index.labels[ids], 2).tolist()
    online = FreshLabels(seed=7, sizes=index.sizes, crops_per_image=2, params=params, labels=None)
    assert online.for_epoch(0).targets(ids, CPU) is None
    batch = next(iter(TrainLoader(index, labels, [VIEW], images_per_step=3, seed=0, device=CPU, workers=1)(0)))
    assert batch.images.shape == (6, 3, 32, 32) and batch.target.dtype == torch.int64


def test_corrupt_round_is_refused_naming_the_store(store, tmp_path):
    bad = tmp_path / "bad_store"
    shutil.copytree(store.path, bad)
    chunk = bad / "probs" / "c" / "1" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    labels = StoredLabels(LabelStore.open(bad))
    labels.for_epoch(0)  # round 0 is intact
    with pytest.raises(MealV2Error, match=f"{bad}: round 1 cannot be read.*mealv2 verify"):
        labels.for_epoch(1)
