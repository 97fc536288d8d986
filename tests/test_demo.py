"""`mealv2 demo` and its dataset generator (mealv2/synthetic.py)."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import re
import shlex
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
    b = generate(tmp_path / "b", SMALL)
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
    from mealv2.common.dataset import build_index
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


@pytest.mark.slow
def test_demo_reduced_size(tmp_path):
    from mealv2.cli import cli

    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--classes", "4", "--images-per-class", "10", "--val-per-class", "6",
            "--teachers", "test_resnet,test_byobnet", "--teacher-epochs", "2", "--epochs", "2",
            "--res", "32", "--batch-size", "32", "--device", "cpu"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    printed = result.output

    # the table is printed, the report and the plot are written
    for row in ("teacher 1", "teacher 2", "ensemble", "student (stored)", "student (hard)"):
        assert re.search(rf"^\| {re.escape(row)} ", printed, re.M), f"row {row!r} missing from the printed table"
    report = (out / "report.md").read_text()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _table(report, "model")
    assert rows == _table(printed, "model"), "report.md and the printed table differ"

    # the printed commands are mealv2 command lines, the same as the report's
    # (lines like "mealv2 train: ..." are the commands' own progress output, not command lines)
    commands = [l for l in printed.splitlines() if re.match(r"mealv2 [a-z]+ ", l)]
    commands = list(dict.fromkeys(commands))   # printed once as run ("$ ...") and once in the summary
    assert commands and all(c in report for c in commands)
    parsed = [shlex.split(c)[1:] for c in commands]
    from mealv2.cli import COMMANDS
    assert all(p[0] in COMMANDS for p in parsed)
    assert sum(p[0] == "train" for p in parsed) == 4 and sum(p[0] == "eval" for p in parsed) == 4
    assert sum(p[0] == "label" for p in parsed) == 1

    # every top-1 in the report comes from the runs: re-run the printed eval lines
    evals = {Path(p[p.index("--checkpoint") + 1]): p for p in parsed if p[0] == "eval"}
    teacher_ckpts = sorted(c for c in evals if c.parent.parent.name == "teachers")
    by_row = {"teacher 1": teacher_ckpts[0], "teacher 2": teacher_ckpts[1],
              "student (stored)": next(c for c in evals if "stored" in c.parent.name),
              "student (hard)": next(c for c in evals if "hard" in c.parent.name)}
    for row, ckpt in by_row.items():
        again = json.loads(_run(evals[ckpt]).strip().splitlines()[-1])
        assert rows[row]["val top-1 (%)"] == f"{again['top1']:.2f}", row
        assert rows[row]["val top-5 (%)"] == f"{again['top5']:.2f}", row

    # ... and the students' numbers equal the last row of their runs' metrics.csv (same validate())
    for row in ("student (stored)", "student (hard)"):
        with open(by_row[row].parent / "metrics.csv", newline="") as f:
            metrics = list(csv.DictReader(f))
        assert len(metrics) == 2
        assert rows[row]["val top-1 (%)"] == f"{float(metrics[-1]['val_top1']):.2f}", row

    # the ensemble: the mean of the teachers' softmax, computed here independently
    assert rows["ensemble"]["val top-1 (%)"] == f"{_ensemble_top1(teacher_ckpts, out / 'data' / 'val', 32):.2f}"

    # the store figures are those `mealv2 inspect` reports
    inspect_line = next(p for p in parsed if p[0] == "inspect")
    summary = json.loads(_run(inspect_line))
    assert f"{summary['bytes_per_crop']} bytes per crop" in report
    assert f"{summary['bytes_on_disk'] / 1024:.1f} KiB on disk" in report
    assert summary["crops"] == 2 * 40 * 2   # rounds (= epochs) x images x crops per image

    # the stage times and the settings are in the report
    stages = _table(report, "stage")
    assert {"generate dataset", "train teachers", "label", "evaluate", "total"} <= set(stages)
    assert all(float(v["time (s)"]) >= 0 for v in stages.values())
    results = json.loads((out / "results.json").read_text())
    assert results["students"]["stored"]["top1"] == pytest.approx(float(rows["student (stored)"]["val top-1 (%)"]),
                                                                   abs=0.005)


def _ensemble_top1(ckpts: list[Path], val: Path, res: int) -> float:
    import torch

    from mealv2.common.dataset import build_index
    from mealv2.common.crop_loader import decode_rgb
    from mealv2.stage2_train.evaluate import load_model
    from mealv2.stage2_train.validate import eval_transform

    index = build_index(val)
    models = [load_model(str(c), None) for c in ckpts]
    correct = 0
    with torch.no_grad():
        for i in range(len(index)):
            image = decode_rgb(index.path(i))
            p = sum(torch.softmax(m.model(eval_transform(res, m.mean, m.std)(image)[None]), 1) for m in models)
            correct += int(p.argmax(1).item() == index.labels[i])
    return 100.0 * correct / len(index)
