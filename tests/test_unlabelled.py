"""Unlabelled images (a folder of loose images, a CSV with only a path column) labelled by teachers
whose classes become the store's, and a labelled dataset labelled by teachers with more classes.

The teachers here are trained outside mealv2 (conftest.train_outside_mealv2) with their own class
order, so a store whose class names or order were taken from anywhere but the teachers would put
the wrong names on its top-1 ids: the tests compare the stored top-1 names with the true class of
each unlabelled image (known here from where the image was made).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner

from conftest import make_image_dataset, train_outside_mealv2
from mealv2.common.data.dataset import build_index
from mealv2.common.errors import MealV2Error
from mealv2.common.models.checkpoints import ModelSpecError, load_checkpoint_file, save_checkpoint
from mealv2.common.models.runtime import Runtime
from mealv2.common.store.label_store import LabelStore
from mealv2.common.models.teachers import timm_class_names
from mealv2.stage1_label.config import LabelConfig
from mealv2.stage1_label.labeler import run_label
from mealv2.stage1_label.store_commands import inspect
from mealv2.stage2_train.evaluate import evaluate
from mealv2.stage2_train.config import TrainConfig
from mealv2.stage2_train.trainer import train
from mealv2.stage2_train.validate import class_order, validate

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
ORDER = ["class_2", "class_0", "class_1"]                  # the teachers' output order, not the folders'
WIDE = ["bird", "class_2", "class_0", "cat", "class_1"]    # a teacher of 5 classes that include the 3


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Labelled data, teachers trained on it, and unlabelled images of the same classes."""
    work = tmp_path_factory.mktemp("unlabelled")
    data = make_image_dataset(work / "data", num_classes=3, per_class=8, seed=3)
    sd = train_outside_mealv2(data, work / "teacher.pth", ORDER, *IMAGENET, seed=0)
    state = torch.load(sd)
    model = timm.create_model("test_resnet", num_classes=3)
    model.load_state_dict(state)
    ckpt = work / "teacher.pt"
    save_checkpoint(ckpt, model=model, arch="test_resnet", classes=ORDER, res=32, mean=IMAGENET[0], std=IMAGENET[1])
    # The same teacher with two more outputs that never win (zero weights, bias -10).
    wide_state = {k: v.clone() for k, v in state.items()}
    for key, fill in (("fc.weight", 0.0), ("fc.bias", -10.0)):
        rows = torch.full((5, *state[key].shape[1:]), fill)
        rows[[WIDE.index(c) for c in ORDER]] = state[key]
        wide_state[key] = rows
    wide = timm.create_model("test_resnet", num_classes=5)
    wide.load_state_dict(wide_state)
    wide_ckpt = work / "wide.pt"
    save_checkpoint(wide_ckpt, model=wide, arch="test_resnet", classes=WIDE, res=32, mean=IMAGENET[0],
                    std=IMAGENET[1])
    classes_file = work / "classes.txt"
    classes_file.write_text("\n".join(ORDER) + "\n")

    pool = make_image_dataset(work / "pool", num_classes=3, per_class=6, seed=11)
    flat, truth = work / "flat", {}
    for p in sorted(pool.glob("*/*")):   # loose images, and a hidden folder that is not looked into
        rel = f"{p.parent.name}-{p.name}"
        (flat / ".thumbs").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, flat / rel)
        shutil.copy(p, flat / ".thumbs" / rel)
        truth[rel] = p.parent.name
    csv = work / "pool.csv"
    rows = sorted(str(p.relative_to(work)) for p in pool.glob("*/*"))
    csv.write_text("path\n" + "\n".join(rows) + "\n")
    truth.update({r: Path(r).parent.name for r in rows})
    return SimpleNamespace(work=work, data=data, sd=f"test_resnet={sd}", ckpt=str(ckpt), wide=str(wide_ckpt),
                           classes_file=str(classes_file), flat=flat, csv=csv, truth=truth)


def label(data, teachers, out, **kw) -> LabelStore:
    return run_label(LabelConfig(data=str(data), teachers=list(teachers), out=str(out), rounds=1, crops_per_image=2,
                                 res=32, scale=(0.35, 1.0), topk=2, batch_size=16, device="cpu",
                                 workers=2, shard_size=64, progress=False, **kw))


def train_cfg(data, out, **kw) -> TrainConfig:
    return TrainConfig(**{"data": str(data), "out": str(out), "arch": "test_resnet", "epochs": 1, "batch_size": 8,
                          "workers": 2, "device": "cpu", "progress": False, **kw})


def stored_top1_names(store: LabelStore) -> list[str]:
    top1 = store.read_round(0).ids[..., 0]
    return [[store.attrs["classes"][c] for c in row] for row in top1]


@pytest.fixture(scope="module")
def stores(w, tmp_path_factory):
    """The flat folder and the path-only CSV, each labelled by the checkpoint and by state dict + --classes."""
    out = tmp_path_factory.mktemp("stores")
    return {(d, t): label(getattr(w, d), [getattr(w, t)], out / f"{d}-{t}",
                          classes_file=w.classes_file if t == "sd" else None)
            for d in ("flat", "csv") for t in ("ckpt", "sd")}


@pytest.mark.parametrize("data", ["flat", "csv"])
@pytest.mark.parametrize("teacher", ["ckpt", "sd"])
def test_unlabelled_images_take_the_teachers_classes(w, stores, data, teacher):
    store = stores[(data, teacher)]
    index = build_index(getattr(w, data))
    assert not index.labelled and index.classes == () and (index.labels == -1).all()
    if data == "flat":
        assert sorted(index.relpaths) == sorted(p.name for p in w.flat.iterdir() if p.is_file())
    a = store.attrs
    assert a["classes"] == ORDER                                          # the teachers' names, in their order
    assert (store.labels() == -1).all() and a["dataset"]["fingerprint"] == index.fingerprint
    assert a["teacher_check"] == [{"teacher": getattr(w, teacher), "skipped": True, "why": "no labels"}]
    # the stored top-1 names are the images' true classes (a wrong name or order would not be)
    truth = [w.truth[str(Path(index.relpaths[i]).relative_to(".")) if data == "flat" else
                     str(Path(index.path(i)).relative_to(w.work))] for i in range(len(index))]
    names = stored_top1_names(store)
    agree = np.mean([n == t for row, t in zip(names, truth) for n in row])
    assert agree > 0.8


def test_labelling_unlabelled_images_says_where_the_classes_come_from(w, tmp_path, capsys):
    label(w.flat, [w.ckpt], tmp_path / "s")
    out = capsys.readouterr().out
    assert "classes: DATA has no labels; the teachers' 3 classes ['class_2', 'class_0', 'class_1']" in out
    assert "teacher check: not run: DATA has no labels" in out


def test_train_on_unlabelled_store_and_eval_on_labelled_val(w, stores, tmp_path, capsys):
    run = tmp_path / "run"
    rows = train(train_cfg(w.csv, run, labels=str(stores[("csv", "sd")].path), val=str(w.data), epochs=2))
    out = capsys.readouterr().out
    assert "classes: DATA has no labels; the student learns the store's 3 (the teachers')" in out
    assert f"--val {w.data}: its 3 classes are mapped by name onto the student's 3" in out
    ckpt = load_checkpoint_file(run / "last.pt")
    assert ckpt["classes"] == ORDER
    # eval maps the checkpoint's classes onto the val folders by name: the same figure as training's val
    r = CliRunner().invoke(evaluate, [str(w.data), "--checkpoint", str(run / "last.pt"), "--json", "--device", "cpu",
                                      "--workers", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["top1"] == pytest.approx(rows[-1]["val_top1"])


def test_validation_scores_by_name_in_the_val_order_and_on_subsets(w, tmp_path):
    """The teacher (outputs in ORDER) scored on the folders (sorted order) and on two of its classes."""
    model = timm.create_model("test_resnet", num_classes=3)
    model.load_state_dict(torch.load(w.sd.split("=", 1)[1]))
    full, runtime = build_index(w.data), Runtime(torch.device("cpu"))
    by_name = validate(model, full, 32, *IMAGENET, runtime, order=class_order(ORDER, full, "val"))
    by_position = validate(model, full, 32, *IMAGENET, runtime)
    assert by_name["top1"] > 80 and by_position["top1"] < 50
    sub = tmp_path / "sub"
    for c in ("class_1", "class_0"):
        shutil.copytree(w.data / c, sub / c)
    subset = build_index(sub)
    scored = validate(model, subset, 32, *IMAGENET, runtime, order=class_order(ORDER, subset, "val"))
    assert scored["top1"] > 80 and scored["num_images"] == 16 and scored["top5"] == 100.0
    (sub / "zebra").mkdir()
    shutil.copy(next((w.data / "class_2").glob("*.jpg")), sub / "zebra" / "z.jpg")
    with pytest.raises(MealV2Error, match=r"--val .*sub has class\(es\) \['zebra'\] that the model does not know"):
        class_order(ORDER, build_index(sub), f"--val {sub}")


def test_refusals(w, stores, tmp_path):
    with pytest.raises(ModelSpecError, match=r"a state dict does not record its classes and DATA has no labels; "
                                             r"pass --classes FILE"):
        label(w.flat, [w.sd], tmp_path / "a")
    other = tmp_path / "other.pt"
    ck = load_checkpoint_file(w.ckpt)
    save_checkpoint(other, model=timm.create_model("test_resnet", num_classes=3), arch="test_resnet",
                    classes=["class_2", "class_0", "zebra"], res=32, mean=ck["mean"], std=ck["std"])
    with pytest.raises(ModelSpecError) as err:
        label(w.flat, [w.ckpt, str(other)], tmp_path / "b")
    msg = str(err.value)
    assert f"teacher 1 '{w.ckpt}'" in msg and f"teacher 2 '{other}'" in msg
    assert "only teacher 1 has ['class_1'], only teacher 2 has ['zebra']" in msg
    with pytest.raises(MealV2Error, match=r"--hard-labels: DATA .*flat has no labels"):
        train(train_cfg(w.flat, tmp_path / "h", hard_labels=True))
    val = tmp_path / "val"
    shutil.copytree(w.data, val)
    (val / "class_2").rename(val / "zebra")
    with pytest.raises(MealV2Error, match=r"--val .*val has class\(es\) \['zebra'\] that the model does not know"):
        train(train_cfg(w.flat, tmp_path / "v", labels=str(stores[("flat", "ckpt")].path), val=str(val)))
    assert not (tmp_path / "v" / "last.pt").exists() and not (tmp_path / "a").exists()


def test_inspect_shows_the_histogram_of_predicted_classes(stores):
    store = stores[("flat", "ckpt")]
    r = CliRunner().invoke(inspect, [str(store.path)])
    assert r.exit_code == 0, r.output
    line = next(s for s in r.output.splitlines() if s.startswith("top1_histogram"))
    counts = np.bincount(store.read_round(0).ids[..., 0].ravel(), minlength=3)
    expected = sorted(zip(-counts, range(3)))
    assert line.split(": ", 1)[1] == ", ".join(f"{ORDER[c]} {100 * -n / counts.sum():.1f}%" for n, c in expected if n)
    assert "top1_agreement" not in r.output and "teacher check skipped (no labels)" in r.output
    summary = json.loads(CliRunner().invoke(inspect, [str(store.path), "--json"]).output)
    assert summary["top1_agreement"] is None and sum(summary["top1_histogram"].values()) == pytest.approx(1, abs=1e-3)


def test_a_labelled_dataset_labelled_by_teachers_with_more_classes(w, tmp_path, capsys):
    store = label(w.data, [w.wide], tmp_path / "wide")
    out = capsys.readouterr().out
    assert ("classes: the teachers' 5 classes ['bird', 'class_2', 'class_0', '...']; DATA's 3 are among them "
            "(its labels mapped by name), and students are trained on all 5") in out
    assert "teacher check: " in out and ": ok" in out            # labels mapped by name agree with the teacher
    index = build_index(w.data)
    assert store.attrs["classes"] == WIDE
    assert [WIDE[c] for c in store.labels()] == [index.classes[c] for c in index.labels]
    assert store.attrs["teacher_check"][0]["agreement"] > 0.8
    assert store.attrs["dataset"]["fingerprint"] == index.fingerprint
    rows = train(train_cfg(w.data, tmp_path / "run", labels=str(store.path), val=str(w.data)))
    out = capsys.readouterr().out
    assert "classes: the student learns the store's 5 (the teachers'); DATA's 3 are among them" in out
    assert "its 3 classes are mapped by name onto the student's 5; top-1/top-5 are taken among those 3" in out
    assert load_checkpoint_file(tmp_path / "run" / "last.pt")["classes"] == WIDE and rows[0]["val_top1"] is not None
    # a dataset class the teachers do not know is refused, naming it
    odd = tmp_path / "odd"
    shutil.copytree(w.data, odd)
    (odd / "class_1").rename(odd / "zebra")
    with pytest.raises(ModelSpecError, match=r"DATA has 1 class\(es\) the teachers do not know: \['zebra'\]"):
        label(odd, [w.wide], tmp_path / "odd-store")


def test_timm_ships_imagenet_class_names():
    """A timm pretrained teacher's classes are ImageNet's WordNet ids, the names of ImageNet's folders."""
    names = timm_class_names(timm.models.get_pretrained_cfg("resnet18"))
    assert len(names) == 1000 and names[0] == "n01440764" and len(set(names)) == 1000
