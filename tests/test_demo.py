"""`mealv2 demo` and its dataset generator (mealv2/synthetic.py)."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import re
import shlex
import statistics
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mealv2.synthetic import CLASSES, SyntheticConfig, generate, make_image

SMALL = SyntheticConfig(seed=3, train_per_class=4, val_per_class=2, min_side=32, max_side=80)


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.jpg"))}


# ------------------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_balanced_varied_and_decodable(tmp_path):
    a = generate(tmp_path / "a", SMALL)
    generate(tmp_path / "b", SMALL)
    da, db = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert da == db, "same seed must give the same files byte for byte"
    assert len(da) == len(CLASSES) * (SMALL.train_per_class + SMALL.val_per_class)

    for split, n in (("train", SMALL.train_per_class), ("val", SMALL.val_per_class)):
        assert sorted(p.name for p in a[split].iterdir()) == sorted(CLASSES)
        for name in CLASSES:   # balanced
            assert len(list((a[split] / name).glob("*.jpg"))) == n

    sizes = set()
    for p in (tmp_path / "a").rglob("*.jpg"):
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            im.load()          # decodes fully
            sizes.add(im.size)
    w, h = np.array(sorted(sizes)).T
    assert len(sizes) > len(da) // 2, "image sizes should vary"
    assert (w > h).any() and (w < h).any(), "both landscape and portrait images"
    assert w.min() >= SMALL.min_side and max(w.max(), h.max()) <= SMALL.max_side

    # a different seed gives different images; make_image is pure
    other = SyntheticConfig(**{**SMALL.__dict__, "seed": 4})
    assert not np.array_equal(make_image(SMALL, "train", 0, 0)[0], make_image(other, "train", 0, 0)[0])
    assert np.array_equal(make_image(SMALL, "val", 5, 1)[0], make_image(SMALL, "val", 5, 1)[0])

    # the dataset index (header probe, bad-file detection) accepts every file
    from mealv2.common.data.dataset import build_index
    index = build_index(a["train"])
    assert list(index.classes) == sorted(CLASSES) and len(index) == len(CLASSES) * SMALL.train_per_class


def test_synthetic_reuses_a_complete_dataset_and_rewrites_a_changed_one(tmp_path):
    cfg = SyntheticConfig(seed=0, train_per_class=2, val_per_class=1, num_classes=3, min_side=32, max_side=48)
    paths = generate(tmp_path, cfg)
    first = paths["train"] / "disc" / "disc_0000.jpg"
    mtime = first.stat().st_mtime_ns
    generate(tmp_path, cfg)
    assert first.stat().st_mtime_ns == mtime, "an unchanged config reuses the files"
    generate(tmp_path, SyntheticConfig(**{**cfg.__dict__, "train_per_class": 1}))
    assert not (paths["train"] / "disc" / "disc_0001.jpg").exists(), "stale files of another config removed"


def test_colour_does_not_give_the_class_away():
    """A nearest-centroid classifier on mean RGB (and its spread) stays near chance."""
    cfg = SyntheticConfig(seed=1, train_per_class=30, val_per_class=15, min_side=32, max_side=48)

    def feats(split, n):
        x, y = [], []
        for c in range(cfg.num_classes):
            for j in range(n):
                px = make_image(cfg, split, c, j)[0].reshape(-1, 3).astype(np.float64)
                x.append(np.concatenate([px.mean(0), px.std(0)]))
                y.append(c)
        return np.array(x), np.array(y)

    xt, yt = feats("train", cfg.train_per_class)
    xv, yv = feats("val", cfg.val_per_class)
    centroids = np.stack([xt[yt == c].mean(0) for c in range(cfg.num_classes)])
    pred = np.linalg.norm(xv[:, None] - centroids[None], axis=2).argmin(1)
    assert (pred == yv).mean() < 0.3, f"colour statistics predict the class ({(pred == yv).mean():.2f})"


# ------------------------------------------------------------------------------------- demo
def _table(text: str, first_header: str) -> dict[str, list[str]]:
    """Rows of the markdown table whose header starts with ``first_header``, keyed by column 1."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"| {first_header}"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def _run(args: list[str]) -> str:
    from mealv2.cli import cli

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        cli.main(args, prog_name="mealv2", standalone_mode=False)
    return buffer.getvalue()


def _parse(command: str) -> tuple[str, dict]:
    """A report line as click parses it (unknown flags, bad values, missing paths raise)."""
    from mealv2.cli import cli

    args = shlex.split(command)
    assert args[0] == "mealv2", command
    cmd = cli.get_command(None, args[1])
    assert cmd is not None, command
    return args[1], cmd.make_context(args[1], args[2:]).params


@pytest.mark.slow
def test_demo_reduced_size(tmp_path, monkeypatch):
    from mealv2.cli import cli
    from mealv2.demo import TABLE_HEADER, shipped_teachers

    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--images-per-class", "6", "--val-per-class", "4", "--curve-per-class", "2",
            "--epochs", "4", "--batch-size", "32", "--device", "cpu"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    printed = result.output
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the label store's report (`inspect --report`): the report's table links its pictures, one is shown
    links = re.findall(r"\]\(([^)\s]+)\)", report)
    assert {"labels/report/report.md", "labels/report/disputed.png", "labels/report/topk_mass.png"} <= set(links)
    assert all((out / link).is_file() for link in links) and "![" in report.split("## Label store")[1]

    # the table: printed and in the report alike, one row per model, the columns the user reads
    names = ["teacher 1", "teacher 2", "ensemble", "student A (stored)", "student A (online)",
             "student A (hard)", "student B (stored)", "student B (hard)"]
    rows = _table(report, "model")
    assert list(rows) == names and rows == _table(printed, "model")
    assert list(rows["ensemble"]) == TABLE_HEADER
    assert [r["row"] for r in results["rows"]] == names

    # every number comes from the runs: eval JSON, metrics.csv, the command's own time
    by_row = {r["row"]: r for r in results["rows"]}
    for name in names:
        r = by_row[name]
        assert rows[name]["top-1 (%)"] == f"{r['eval']['top1']:.2f}" and r["top1"] == r["eval"]["top1"], name
        assert rows[name]["top-5 (%)"] == f"{r['eval']['top5']:.2f}", name
        assert r["eval"]["num_images"] == 40, name
        for command in r["commands"]:
            assert command in report, (name, command)
    for name in names[3:]:
        r = by_row[name]
        assert r["train_s"] > 0 and r["train_cpu_s"] > 0 and r["img_per_s"] > 0, name
        assert rows[name]["train time (s)"] == f"{r['train_s']:.1f}", name
        train = next(c for c in r["commands"] if c.startswith("mealv2 train "))
        run = Path(_parse(train)[1]["out"])
        with open(run / "metrics.csv", newline="") as f:
            metrics = list(csv.DictReader(f))
        assert len(metrics) == 4 == len(r["metrics"]), name
        # the curve scores the val-curve subset every epoch; `mealv2 eval` of last.pt on it agrees
        curve = json.loads(_run(["eval", str(out / "data" / "val-curve.csv"), "--checkpoint", str(run / "last.pt"),
                                 "--json"]).strip().splitlines()[-1])
        assert curve["num_images"] == 20 and float(metrics[-1]["val_top1"]) == pytest.approx(curve["top1"]), name
        # ... and `mealv2 eval` run again on the checkpoint gives the row's numbers
        again = json.loads(_run(shlex.split(r["commands"][-1])[1:]).strip().splitlines()[-1])
        assert (again["top1"], again["top5"]) == (r["top1"], r["top5"]), name
    # the same student and budget in each mode; only the targets differ
    a_train = [_parse(next(c for c in by_row[n]["commands"] if c.startswith("mealv2 train ")))[1] for n in names[3:6]]
    for key in ("arch", "epochs", "batch_size", "lr", "opt", "cos", "warmup_epochs", "seed"):
        assert len({str(p[key]) for p in a_train}) == 1, key
    assert [bool(p["labels"]) for p in a_train] == [True, False, False]
    assert [bool(p["teachers"]) for p in a_train] == [False, True, False]
    assert [p["hard_labels"] for p in a_train] == [False, False, True]

    # the gaps are the rows' differences, printed and in the report
    g = results["gaps"]
    assert g["stored_minus_hard"] == pytest.approx(by_row["student A (stored)"]["top1"] - by_row["student A (hard)"]["top1"])
    assert g["stored_minus_online"] == pytest.approx(by_row["student A (stored)"]["top1"] - by_row["student A (online)"]["top1"])
    assert g["time_ratio_stored_online"] == pytest.approx(by_row["student A (stored)"]["train_s"] / by_row["student A (online)"]["train_s"])
    assert g["cpu_ratio_stored_online"] == pytest.approx(by_row["student A (stored)"]["train_cpu_s"] / by_row["student A (online)"]["train_cpu_s"])
    line = f"stored labels - hard labels: {g['stored_minus_hard']:+.2f} top-1 points"
    assert line in printed and line in report

    # the seed noise: student A's stored run and its reruns with the next seeds, each scored by `mealv2 eval`
    noise = results["seed_noise"]
    assert noise["seeds"] == [0, 1, 2] and noise["top1"][0] == by_row["student A (stored)"]["top1"]
    assert noise["std"] == pytest.approx(statistics.stdev(noise["top1"]))
    same = lambda params: {k: v for k, v in params.items() if k not in ("seed", "out", "val")}
    stored_train = _parse(by_row["student A (stored)"]["commands"][1])[1]
    for seed, top1, (train, evaluate) in zip(noise["seeds"][1:], noise["top1"][1:],
                                             zip(noise["commands"][::2], noise["commands"][1::2])):
        params = _parse(train)[1]
        assert params["seed"] == seed and same(params) == same(stored_train)   # only the seed differs
        assert json.loads(_run(shlex.split(evaluate)[1:]).strip().splitlines()[-1])["top1"] == top1
        assert train in report and evaluate in report
    for key, target in (("stored_minus_hard", "+2"), ("stored_minus_online", "-1")):
        said = f"(target >= {target}: {results['verdicts'][key]})"
        assert said in printed and said in report
    noise_line = f"std {noise['std']:.2f}), so two single runs differ by up to ±{noise['band']:.2f} points"
    assert noise_line in printed and noise_line in report

    # the ensemble: the mean of the teachers' softmax, computed here independently
    assert rows["ensemble"]["top-1 (%)"] == f"{_ensemble_top1(shipped_teachers(), out / 'data' / 'val'):.2f}"

    # the store figures are those `mealv2 inspect` reports; times are positive and add up
    summary = json.loads(_run(shlex.split(next(c for c in results["commands"] if c.startswith("mealv2 inspect ")))[1:]))
    assert summary == results["store"] and f"{summary['bytes_per_crop']} bytes per crop" in report
    # one round per pass: 4 epochs of 60 crops in steps of 32 crops = 8 steps = 2 passes of 4 steps
    assert results["passes"] == summary["rounds_complete"] == 2 and summary["crops"] == 2 * 60 * 2
    # ... and round p holds the crops that the online and hard-label runs of the seed draw in pass p
    # (the report's "same crops in the same order"; the order is the loader's, drawn from the seed alike)
    from mealv2.common.data.crops import CropParams
    from mealv2.common.data.dataset import build_index
    from mealv2.common.store.label_store import LabelStore
    from mealv2.stage2_train.loader import FreshLabels

    store = LabelStore.open(out / "labels" / "store.zarr")
    sizes = build_index(out / "data" / "train").sizes
    fresh = FreshLabels(0, sizes, 2, CropParams.from_attrs(store.attrs["crop"]), None)
    ids = np.arange(len(sizes))
    for r in range(2):
        stored, drawn = store.read_round(r), fresh.for_pass(r).crops(ids)
        assert np.array_equal(stored.boxes, drawn[0]) and np.array_equal(stored.flips.astype(bool), drawn[1]), r
    assert "see the same crops in the same order" in report
    stages = _table(report, "stage")
    assert {"generate dataset", "label", "train student (stored)", "train student (online)", "evaluate",
            "total"} <= set(stages)
    assert all(float(v["wall (s)"]) > 0 for v in stages.values())
    assert sum(v["wall_s"] for v in results["stages"].values()) <= results["total"]["wall_s"]
    assert f"mealv2 demo: {results['total']['wall_s']:.0f} s in all" in printed

    # every command in the report is a real `mealv2` command line (parsed by click, paths exist);
    # the shipped teachers' commands ran in their own folder: make their paths there
    block = report.split("## Commands to reproduce every row")[1].split("```sh")[1].split("```")[0]
    commands = [c for c in block.splitlines() if c and not c.startswith("#")]
    assert sum(c.startswith("mealv2 train ") for c in commands) >= 5
    monkeypatch.chdir(tmp_path)
    for c in commands:
        if c in by_row["teacher 1"]["commands"] + by_row["teacher 2"]["commands"] and c.startswith("mealv2 train "):
            a = shlex.split(c)
            build = shlex.split(by_row["teacher 1"]["commands"][0])   # mealv2 demo --build-teachers DIR
            for p in (a[2], a[a.index("--out") + 1], a[a.index("--val") + 1]):
                assert Path(p).parts[0] == build[-1], (c, "a path the build command does not create")
            for p in (a[2], a[a.index("--val") + 1]):
                (tmp_path / p).mkdir(parents=True, exist_ok=True)
        _parse(c)


def _ensemble_top1(specs: list[str], val: Path) -> float:
    import torch

    from mealv2.common.data.loaders.base import decode_rgb
    from mealv2.common.data.dataset import build_index
    from mealv2.stage2_train.evaluate import load_model
    from mealv2.stage2_train.validate import eval_crop, normalise

    index = build_index(val)
    models = [load_model(s, None) for s in specs]
    correct = 0
    with torch.no_grad():
        for i in range(len(index)):
            image = decode_rgb(index.path(i))
            p = sum(torch.softmax(m.model.float()(normalise(eval_crop(m.res)(image)[None], m.mean, m.std)), 1)
                    for m in models)
            correct += int(p.argmax(1).item() == index.labels[i])
    return 100.0 * correct / len(index)


def test_a_gap_is_judged_against_the_seed_noise_of_its_runs():
    from mealv2.demo import seed_noise, verdict

    noise = seed_noise({0: 72.2, 1: 70.6, 2: 74.6})
    assert noise["std"] == pytest.approx(statistics.stdev([72.2, 70.6, 74.6]))
    assert noise["band"] == pytest.approx(2 * 2 ** 0.5 * noise["std"])
    assert verdict(-0.9, -1, noise["band"]) == "met"
    assert verdict(-1.9, -1, noise["band"]) == f"within seed noise of it (±{noise['band']:.2f})"
    assert verdict(-1 - noise["band"] - 0.01, -1, noise["band"]) == f"missed by more than seed noise (±{noise['band']:.2f})"


def test_the_demos_ensemble_row_weights_the_teachers_as_their_specs_say(tmp_path):
    """*W weights a teacher in the ensemble `mealv2 label` stores; the demo's ensemble row is that ensemble."""
    from mealv2.demo import ensemble_accuracy, shipped_teachers
    from mealv2.stage2_train.evaluate import evaluate_model

    val = generate(tmp_path / "d", SMALL)["val"]
    first, second = shipped_teachers()
    alone = evaluate_model(val, first, batch_size=64, device="cpu")["top1"]
    assert ensemble_accuracy([f"{first}*1000", second], val, 64, "cpu", 1)["top1"] == alone
    assert ensemble_accuracy([first, second], val, 64, "cpu", 1)["top1"] != alone   # the weight is what made it
