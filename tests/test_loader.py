import shutil

import numpy as np
from PIL import Image
import pytest
import timm
import torch

from mealv2.common.data.loaders.base import View
from mealv2.common.data.crops import CropParams, sample_crops
from mealv2.common.data.dataset import DatasetError, build_index
from mealv2.common.errors import MealV2Error
from mealv2.common.store.label_store import LabelStore
from mealv2.common.data.targets import reconstruct_targets
from mealv2.stage1_label.config import LabelConfig
from mealv2.stage1_label.labeler import run_label
from mealv2.stage2_train.loader import FreshLabels, StoredLabels, TrainLoader, epoch_order, steps_per_epoch

CPU = torch.device("cpu")
VIEW = View(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def store(tiny_data, tmp_path_factory):
    """Two rounds of 3 crops per image of tiny_data, labelled by a random test_resnet."""
    work = tmp_path_factory.mktemp("loader_store")
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), work / "t.pth")
    return run_label(LabelConfig(data=str(tiny_data), teachers=[f"test_resnet={work / 't.pth'}@32"],
                                 out=str(work / "store"), rounds=2, crops_per_image=3, res=32,
                                 topk=2, batch_size=12, workers=2, device="cpu", progress=False))


@pytest.mark.parametrize("n, per_step, world", [(12, 4, 1), (12, 5, 1), (13, 2, 2), (3, 4, 2)])
def test_epoch_order_gives_every_rank_equal_full_steps(n, per_step, world):
    ranks = [epoch_order(n, per_step, seed=1, pass_=0, rank=r, world_size=world) for r in range(world)]
    assert len({r.shape for r in ranks}) == 1 and ranks[0].shape[1] == per_step
    seen = np.concatenate([r.reshape(-1) for r in ranks])
    assert set(seen) == set(range(n))                  # every image, padding only repeats some
    assert len(seen) - n < per_step * world            # less than one step of padding
    np.testing.assert_array_equal(ranks[0], epoch_order(n, per_step, seed=1, pass_=0, rank=0, world_size=world))


def test_epoch_order_changes_with_pass_and_seed():
    a = epoch_order(100, 10, seed=0, pass_=0)
    assert not np.array_equal(a, epoch_order(100, 10, seed=0, pass_=1))
    assert not np.array_equal(a, epoch_order(100, 10, seed=1, pass_=0))
    assert sorted(a.reshape(-1)) == list(range(100))


@pytest.mark.parametrize("n, crops_per_step, steps", [(1_281_167, 512, 2502), (12, 12, 1), (12, 8, 2),
                                                     (10, 64, 1)])
def test_an_epoch_is_n_crops_at_any_crops_per_image(n, crops_per_step, steps):
    """MEAL V2 and FKD count an epoch as N crops: ImageNet at batch 512 is 2502 steps whatever C is."""
    assert steps_per_epoch(n, crops_per_step) == steps


def test_stored_labels_replay_round_p_mod_r(store, tiny_data):
    index = build_index(tiny_data)
    labels = StoredLabels(store)
    rounds = [store.read_round(r) for r in range(2)]
    ids = np.array([5, 0, 7])
    for pass_ in range(4):
        boxes, flips = labels.for_pass(pass_).crops(ids)
        np.testing.assert_array_equal(boxes, rounds[pass_ % 2].boxes[ids])
        np.testing.assert_array_equal(flips, rounds[pass_ % 2].flips[ids].astype(bool))
    loader = TrainLoader(index, labels, [VIEW], images_per_step=4, seed=0, device=CPU, workers=2)
    # 12 images x 3 crops: a pass is 3 steps of 12 crops = 3 epochs of 12 crops
    assert (len(loader), loader.steps_per_pass, loader.passes(6)) == (1, 3, 2.0)
    batches = list(loader.steps(3, 6))   # pass 1: round 1
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
        out[backend] = list(loader.steps(0, 3))
    assert len(out["dali"]) == len(out["torch"]) == 3
    for dali, tv in zip(out["dali"], out["torch"]):
        torch.testing.assert_close(dali.target, tv.target, rtol=0, atol=0)   # identical targets
        for a, b, view in zip(dali.views, tv.views, views):
            assert a.shape == b.shape == (12, 3, view.res, view.res)
            # same crops up to resampling differences (measured ~0.4/255 mean abs difference here)
            diff = ((a - b).abs() * torch.tensor(view.std)[:, None, None]).mean()
            assert diff < 2 / 255, f"view {view.res}px: mean abs pixel difference {diff * 255:.2f}/255"


def test_epochs_tile_the_stream_of_passes(store, tiny_data):
    """An epoch may end mid-pass; the next continues that pass: epochs back to back give exactly
    the batches of the uninterrupted stream, round p mod R in pass p."""
    index = build_index(tiny_data)
    # 12 images, 2 per step: a pass is 6 steps of 6 crops; an epoch is round(12 / 6) = 2 steps
    loader = TrainLoader(index, StoredLabels(store), [VIEW], images_per_step=2, seed=0, device=CPU, workers=2)
    assert (len(loader), loader.steps_per_pass) == (2, 6)
    by_epoch = [b for e in range(5) for b in loader.epoch(e)]      # 10 steps: pass 0 and most of pass 1
    stream = list(loader.steps(0, 10))
    assert len(by_epoch) == len(stream) == 10
    for a, b in zip(by_epoch, stream):
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
        torch.testing.assert_close(a.target, b.target, rtol=0, atol=0)
    step = 7                                                        # pass 1, step 1: round 1
    ids = loader.order(1)[1]
    data = store.read_round(1)
    expected = reconstruct_targets(torch.from_numpy(data.ids[ids].astype(np.int64)).flatten(0, 1),
                                   torch.from_numpy(data.probs[ids]).flatten(0, 1), 3)
    torch.testing.assert_close(stream[step].target, expected)


def test_fresh_labels_draw_new_crops_each_pass_with_dataset_labels(tiny_data):
    index = build_index(tiny_data)
    params = CropParams(res=32)
    labels = FreshLabels(seed=7, sizes=index.sizes, crops_per_image=2, params=params, labels=index.labels)
    ids = np.array([3, 1])
    for pass_ in (0, 1):
        boxes, flips = labels.for_pass(pass_).crops(ids)
        expected = sample_crops(7, pass_, ids, index.sizes[ids], 2, params)
        np.testing.assert_array_equal(boxes, expected[0])
        np.testing.assert_array_equal(flips, expected[1])
    assert not np.array_equal(labels.for_pass(0).crops(ids)[0], labels.for_pass(1).crops(ids)[0])
    target = labels.for_pass(0).targets(ids).to(CPU)
    assert target.tolist() == np.repeat(index.labels[ids], 2).tolist()
    online = FreshLabels(seed=7, sizes=index.sizes, crops_per_image=2, params=params, labels=None)
    assert online.for_pass(0).targets(ids) is None
    batch = next(iter(TrainLoader(index, labels, [VIEW], images_per_step=3, seed=0, device=CPU, workers=1).epoch(0)))
    assert batch.images.shape == (6, 3, 32, 32) and batch.target.dtype == torch.int64


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_an_image_changed_since_labelling_is_refused_naming_it(store, tiny_data, tmp_path, backend):
    """Same name, same size, other pixels: the fingerprint cannot see it, the CRC32C can."""
    data = shutil.copytree(tiny_data, tmp_path / "data")
    changed = data / "class_1" / "img_03.jpg"
    with Image.open(changed) as im:
        im.rotate(180).save(changed, quality=80)
    index = build_index(data)
    assert index.fingerprint == build_index(tiny_data).fingerprint
    loader = TrainLoader(index, StoredLabels(store), [VIEW], images_per_step=12, seed=0, device=CPU,
                         backend=backend, workers=2, expected_crcs=store.crcs(), store_path=store.path)
    with pytest.raises(DatasetError, match=f"{changed}: the file changed since {store.path} was labelled"):
        list(loader.steps(0, 1))
    unchanged = TrainLoader(build_index(tiny_data), StoredLabels(store), [VIEW], images_per_step=12, seed=0,
                            device=CPU, backend=backend, workers=2, expected_crcs=store.crcs())
    assert len(list(unchanged.steps(0, 1))) == 1


def test_corrupt_round_is_refused_naming_the_store(store, tmp_path):
    bad = tmp_path / "bad_store"
    shutil.copytree(store.path, bad)
    chunk = bad / "probs" / "c" / "1" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    labels = StoredLabels(LabelStore.open(bad))
    labels.for_pass(0)  # round 0 is intact
    with pytest.raises(MealV2Error, match=f"{bad}: round 1 cannot be read.*mealv2 verify"):
        labels.for_pass(1)
