"""The commands mealv2 prints for a user to run are built from the config (common.config.command_args) and run
as printed: a run's continuation after Ctrl-C, and a store's repair command (printed by `verify` and by a
refused `train`). The equivalent command of a Python call is tests/test_configs.py's round trip."""
from __future__ import annotations

import json
import shlex
import shutil

import pytest
import timm
import torch

from conftest import flip_chunk_byte, make_image_dataset
from mealv2.common.store.label_store import LabelStore
from mealv2.stage2_train.utils import RunLog
from test_remote import http, store  # noqa: F401 (fixtures: a store served over http://)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = ["--device", "cpu", "--workers", "1", "--batch-size", "8"]


@pytest.fixture
def interrupt_after_an_epoch(monkeypatch):
    """Ctrl-C once an epoch is saved, in the next run only (as a user would press it)."""
    pressed = []
    write = RunLog.write

    def press(self, rows, final=False):
        write(self, rows, final)
        if not pressed:
            pressed.append(len(rows))
            raise KeyboardInterrupt
    monkeypatch.setattr(RunLog, "write", press)
    return pressed


def continuation(stderr: str) -> list[str]:
    """The arguments of the command a run interrupted by Ctrl-C prints to continue it."""
    line = stderr.split("Continue the run with:\n", 1)[1].splitlines()[0].strip()
    words = shlex.split(line)
    assert words[:2] == ["mealv2", "train"], line
    return words[1:]


def test_the_command_printed_after_ctrl_c_continues_the_run(labelled, tmp_path, in_process, interrupt_after_an_epoch):
    """Once `mealv2 train --resume runs/r18 --epochs 300` was printed back as `mealv2 train runs/r18 --epochs 300
    --resume`: RUN taken as DATA, refused."""
    run = tmp_path / "run"
    r = in_process("train", labelled.data, "--labels", labelled.store, "-a", "test_resnet", "-o", run, "--epochs", 2,
                   "--res", 48, *FAST)
    assert r.returncode == 130 and interrupt_after_an_epoch == [1], r.stderr
    assert f"{run / 'last.pt'} holds the last finished epoch" in r.stderr
    r = in_process(*continuation(r.stderr))
    assert r.returncode == 0, r.stderr
    assert f"resuming {run / 'last.pt'} at epoch 1" in r.stdout

    interrupt_after_an_epoch.clear()
    r = in_process("train", "--resume", run, "--epochs", 4)
    assert r.returncode == 130 and interrupt_after_an_epoch == [3], r.stderr
    r = in_process(*continuation(r.stderr))
    assert r.returncode == 0, r.stderr
    assert f"resuming {run / 'last.pt'} at epoch 3" in r.stdout
    rows = json.loads((run / "config.json").read_text())
    assert rows["settings"]["epochs"] == 4 and rows["resolved"]["student_res"] == [48] * 4


def repair_command(stderr: str) -> str:
    return stderr.split("repair: ", 1)[1].split(":\n  ", 1)[1]


def run_printed(in_process, command: str, **fill) -> object:
    """Run the first line of ``command`` with its placeholders (DATA, FILE_N, STORE) filled from ``fill``."""
    words = shlex.split(command.splitlines()[0])
    assert words[:2] == ["mealv2", "label"], command
    args = []
    for w in words[1:]:
        n, eq, placeholder = w.partition("=")
        args.append(f"{n}={fill[placeholder]}" if eq and placeholder in fill else fill.get(w, w))
    return in_process(*args)


def test_the_repair_command_of_a_store_labelled_by_a_state_dict_on_unlabelled_images_runs(tmp_path, in_process):
    """A state dict's class names come from a file (--classes here): the printed command once left it out, and
    `label` then refused it, as DATA has no labels to name the teacher's outputs."""
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), tmp_path / "teacher.pth")
    (tmp_path / "names.txt").write_text("cat\ndog\nbird\n")
    images = make_image_dataset(tmp_path / "folders", num_classes=3, per_class=3)
    loose = tmp_path / "loose"
    loose.mkdir()
    for p in images.glob("*/*"):
        shutil.copy(p, loose / f"{p.parent.name}-{p.name}")
    out = tmp_path / "store"
    r = in_process("label", loose, "-t", f"test_resnet={tmp_path / 'teacher.pth'}@32", "--classes",
                   tmp_path / "names.txt", "-o", out, "--rounds", 1, "--crops-per-image", 2, "--res", 32, "--topk", 2,
                   "--shard-size", 4, "--batch-size", 8, *FAST[:4])
    assert r.returncode == 0, r.stderr
    flip_chunk_byte(out, "probs", 0, 1)
    r = in_process("verify", out)
    assert r.returncode == 1
    command = repair_command(r.stderr)
    assert " --teacher-classes 1=FILE_1" in command and "FILE_1: teacher 1's class names" in command
    (tmp_path / "file1.txt").write_text("\n".join(LabelStore.open(out).attrs["teachers"][0]["output_classes"]))
    r = run_printed(in_process, command, DATA=loose, FILE_1=tmp_path / "file1.txt")
    assert r.returncode == 0, r.stderr
    assert "repair: probs/c/0/0/0/0[1]: damaged or missing" in r.stdout
    assert in_process("verify", out).returncode == 0


def test_the_repair_command_of_a_store_read_over_http_names_where_to_run_it(http, tiny_data, tmp_path,  # noqa: F811
                                                                            in_process, monkeypatch):
    """`label` writes no http:// URL: the command once said `-o http://...`, which it refuses."""
    monkeypatch.setenv("MEALV2_CACHE", str(tmp_path / "cache"))
    flip_chunk_byte(http.root, "probs", 1, 0)
    r = in_process("verify", http.url)
    assert r.returncode == 1
    command = repair_command(r.stderr)
    assert " --out STORE " in command and "http" not in command.splitlines()[0]
    assert f"STORE: {http.url} where `mealv2 label` can write it" in command
    local = shutil.copytree(http.root, tmp_path / "store.zarr")   # where it can be written
    r = run_printed(in_process, command, DATA=tiny_data, STORE=local)
    assert r.returncode == 0, r.stderr
    assert in_process("verify", local).returncode == 0


def test_the_repair_command_of_a_store_with_per_teacher_layers_keeps_them(tiny_data, tmp_path, in_process):
    """A store labelled with --keep-teachers is resumed only by a command keeping its layers: its printed repair
    command says --keep-teachers, and run as printed it labels a damaged layer's shard again."""
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), tmp_path / "teacher.pth")
    out = tmp_path / "store"
    r = in_process("label", tiny_data, "-t", f"test_resnet={tmp_path / 'teacher.pth'}@32", "-o", out, "--rounds", 1,
                   "--crops-per-image", 2, "--res", 32, "--topk", 2, "--shard-size", 4, "--keep-teachers", *FAST)
    assert r.returncode == 0, r.stderr
    flip_chunk_byte(out, "teachers/0/ids", 0, 1)
    r = in_process("verify", out)
    assert r.returncode == 1
    command = repair_command(r.stderr)
    assert " --keep-teachers" in command
    r = run_printed(in_process, command, DATA=tiny_data)
    assert r.returncode == 0, r.stderr
    assert "repair: teachers/0/ids/c/0/0/0/0[1]: damaged or missing" in r.stdout
    assert in_process("verify", out).returncode == 0
