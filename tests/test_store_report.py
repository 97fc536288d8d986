"""The record of what each labelling run took, which the labeller keeps in the store and `inspect` shows."""
from __future__ import annotations

import json

import pytest
import timm
import torch

from conftest import make_image_dataset
from mealv2.common.data.crops import CropParams
from mealv2.common.store.label_store import RUNS_KEY, LabelStore
from mealv2.stage1_label.config import LabelConfig
from mealv2.stage1_label.labeler import run_label


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("label")
    data = make_image_dataset(root / "data", num_classes=3, per_class=8)
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), root / "teacher.pth")
    return root, data, f"test_resnet={root / 'teacher.pth'}@32"


def _config(setup, out, **over) -> LabelConfig:
    _, data, teacher = setup
    kw = dict(data=str(data), teachers=[teacher], out=str(out), rounds=3, crops_per_image=2, crop=CropParams(res=32),
              topk=2, batch_size=8, shard_size=10, device="cpu", workers=1, teacher_check=False, progress=False)
    return LabelConfig(**{**kw, **over})


@pytest.mark.slow
def test_inspect_shows_what_the_run_took_and_a_run_with_nothing_to_do_records_nothing(setup, tmp_path, in_process):
    out = tmp_path / "store.zarr"
    store = run_label(_config(setup, out, rounds=1))
    digest, (run,) = store.digest, store.runs()
    r = in_process("inspect", out)
    assert r.returncode == 0, r.stderr
    assert (f"{run['finished']}: {run['crops']} crops in {run['label_s']:.1f} s ({run['crops_per_s']:.1f} crops/s) on "
            f"cpu") in r.stdout
    assert json.loads(in_process("inspect", out, "--json").stdout)["runs"] == [run]
    again = run_label(_config(setup, out, rounds=1))   # complete: nothing labelled, nothing recorded
    assert again.runs() == [run] and again.digest == digest
    # the record is outside the attributes' digest: a store made before it (no such key) still opens
    meta = json.loads((out / "zarr.json").read_text())
    del meta["attributes"][RUNS_KEY]
    (out / "zarr.json").write_text(json.dumps(meta))
    assert LabelStore.open(out).runs() == []
    assert "none recorded" in in_process("inspect", out).stdout
