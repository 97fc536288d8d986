"""Fault injection: SIGKILL at named moments (mealv2/common/faults.py), then resume.

A label store or a training run must come out of any kill exactly as an uninterrupted run
would have made it, and nothing the user made may be lost or left half written.
"""
from __future__ import annotations

import csv
import os
import signal

import numpy as np
import pytest
import timm
import torch
import zarr

from conftest import flip_chunk_byte, make_image_dataset, run_cli
from mealv2.benchmarks.common import random_teachers

pytestmark = pytest.mark.slow

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = make_image_dataset(root / "data", num_classes=3, per_class=4, seed=3)
    teachers = random_teachers(("test_resnet", "test_efficientnet"), 3, root, 32)
    return root, data, ",".join(teachers)


def label_args(data, teachers, out, rounds=3):
    return ["label", str(data), "-t", teachers, "-o", str(out), "--rounds", str(rounds),
            "--crops-per-image", "2", "--res", "32", "--topk", "2", "--shard-size", "2",
            "--batch-size", "4", "--workers", "1"]


def store_arrays(path) -> dict:
    group = zarr.open_group(str(path), mode="r")
    return {name: group[name][:] for name in ("boxes", "flips", "ids", "probs", "done", "labels")}


def assert_same_store(a, b):
    x, y = store_arrays(a), store_arrays(b)
    for name in x:
        assert np.array_equal(x[name], y[name]), f"array {name} differs from the uninterrupted run's"


@pytest.fixture(scope="module")
def reference(setup):
    root, data, teachers = setup
    out = root / "reference.zarr"
    result = run_cli(*label_args(data, teachers, out), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    return out


# Twelve moments: while decoding, in the teachers' forward pass, between the arrays of a shard's
# write, between a shard's data and its done mark, between a round's packed objects and their
# commit, and (below) in the middle of an append.
KILLS = ["decode:1", "decode:4", "forward:1", "forward:5", "chunk_write:1", "chunk_write:7",
         "shard_mark:1", "shard_mark:9", "pack:1", "pack:3"]


# The killed runs are processes of their own (SIGKILL); what comes after a kill (resume, verify) is the
# same code in this process, without an interpreter start each.
@pytest.mark.parametrize("kill_at", KILLS)
def test_label_killed_then_resumed_equals_uninterrupted(setup, reference, tmp_path, kill_at, in_process):
    _, data, teachers = setup
    out = tmp_path / "store.zarr"
    killed = run_cli(*label_args(data, teachers, out), env={**ONE_THREAD, "MEALV2_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, f"the fault point {kill_at} was never reached"
    resumed = in_process(*label_args(data, teachers, out))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_store(out, reference)
    assert in_process("verify", str(out)).returncode == 0


@pytest.mark.parametrize("kill_at", ["append:1", "append:3"])
def test_append_killed_then_resumed_equals_uninterrupted(setup, reference, tmp_path, kill_at, in_process):
    _, data, teachers = setup
    out = tmp_path / "store.zarr"
    assert in_process(*label_args(data, teachers, out, rounds=2)).returncode == 0
    killed = run_cli(*label_args(data, teachers, out, rounds=3), env={**ONE_THREAD, "MEALV2_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, f"the fault point {kill_at} was never reached"
    resumed = in_process(*label_args(data, teachers, out, rounds=3))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_store(out, reference)


def train_args(data, store, run, epochs):
    return ["train", str(data), "--labels", str(store), "-a", "test_resnet", "--out", str(run),
            "--epochs", str(epochs), "--batch-size", "8", "--lr", "0.05", "--workers", "1",
            "--device", "cpu", "--seed", "0"]


def losses(run) -> list[float]:
    with open(run / "metrics.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def full_run(setup, reference):
    """The uninterrupted 3-epoch run every killed-and-resumed one must reproduce."""
    root, data, _ = setup
    assert run_cli(*train_args(data, reference, root / "full", 3), env=ONE_THREAD).returncode == 0
    return root / "full"


@pytest.mark.parametrize("kill_at", ["train_step:5", "checkpoint_write:2", "checkpoint_write:3"])
def test_train_killed_then_resumed_reproduces_the_loss_curve(setup, reference, full_run, tmp_path, kill_at,
                                                             in_process):
    _, data, _ = setup
    run = tmp_path / "run"
    killed = run_cli(*train_args(data, reference, run, 3), env={**ONE_THREAD, "MEALV2_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, f"the fault point {kill_at} was never reached"
    for ckpt in run.glob("*.pt"):  # whatever is in place is a whole, loadable checkpoint
        torch.load(ckpt, map_location="cpu", weights_only=True)
    resumed = in_process(*train_args(data, reference, run, 3), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(run) == pytest.approx(losses(full_run), abs=1e-6)
    assert not [p.name for p in run.iterdir() if ".partial" in p.name], "temp files left behind"


def test_second_writer_is_refused_and_a_dead_one_leaves_no_stale_lock(setup, tmp_path, in_process):
    """The second writer here is this process (another process: test_label_cli's concurrent writer)."""
    from mealv2.common.store.label_store import acquire_writer_lock

    _, data, teachers = setup
    out = tmp_path / "store.zarr"
    lock = acquire_writer_lock(out)
    try:
        second = in_process(*label_args(data, teachers, out, rounds=1))
        assert second.returncode != 0
        assert "being written by another" in second.stderr and str(out) in second.stderr
    finally:
        lock.release()
    killed = run_cli(*label_args(data, teachers, out, rounds=1), env={"MEALV2_KILL_AT": "shard_mark:1"})
    assert killed.returncode == -signal.SIGKILL
    assert in_process(*label_args(data, teachers, out, rounds=1)).returncode == 0


def test_full_disk_is_a_clear_error_and_the_store_resumes_after(setup, tmp_path, monkeypatch, capsys):
    """Disk full (or the store made read-only) mid-run: one clear line, exit 2, and the same
    command completes the store once space is back."""
    import errno

    from mealv2.cli import main
    from mealv2.common.store import label_store as store_module

    _, data, teachers = setup
    out = tmp_path / "store.zarr"
    args = label_args(data, teachers, out, rounds=2) + ["--device", "cpu"]
    real_write = store_module.LabelStore.write_shard
    writes = {"n": 0}

    def write_until_full(self, *a, **kw):
        writes["n"] += 1
        if writes["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "ids"))
        return real_write(self, *a, **kw)

    monkeypatch.setattr(store_module.LabelStore, "write_shard", write_until_full)
    monkeypatch.setattr("sys.argv", ["mealv2", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and str(out / "ids") in err
    assert not store_module.LabelStore.open(out).complete

    monkeypatch.setattr(store_module.LabelStore, "write_shard", real_write)
    main()
    assert store_module.LabelStore.open(out).complete


class _RunsCode:
    """Unpickling this runs a shell command: what a crafted checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_runs_code_is_refused_and_a_trusted_one_loads(setup, tmp_path, in_process):
    """Checkpoints are read as data: a pickle whose __reduce__ runs a command is refused, as a
    teacher and as --init (eval and export load through the same function), before anything of
    it runs; --trust-checkpoint loads a file that pickles more than tensors (here a datetime)."""
    import datetime

    _, data, _ = setup
    marker = tmp_path / "pwned"
    state = timm.create_model("test_resnet", num_classes=3).state_dict()
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": state, "extra": _RunsCode(marker)}, evil)
    for args in (label_args(data, f"test_resnet={evil}@32", tmp_path / "s.zarr", rounds=1),
                 ["train", str(data), "--hard-labels", "-a", "test_resnet", "--out", str(tmp_path / "run"),
                  "--init", str(evil), "--dry-run", "--device", "cpu"]):
        result = in_process(*args)
        assert result.returncode == 2, result.stderr
        assert f"{evil}: refused to load" in result.stderr and "posix.system" in result.stderr
        assert "--trust-checkpoint" in result.stderr
        assert not marker.exists(), f"`mealv2 {args[0]}` ran the checkpoint's code"

    dated = tmp_path / "dated.pth"
    torch.save({"state_dict": state, "saved": datetime.datetime(2024, 1, 1)}, dated)
    eval_args = ["eval", str(data), "--checkpoint", str(dated), "-a", "test_resnet", "--res", "32", "--json"]
    refused = in_process(*eval_args)
    assert refused.returncode == 2 and "datetime.datetime" in refused.stderr
    trusted = in_process(*eval_args, "--trust-checkpoint")
    assert trusted.returncode == 0, trusted.stderr


def hard_label_train(data, run, *extra, epochs=1):
    return ["train", str(data), "--hard-labels", "-a", "test_resnet", "--out", str(run), "--epochs", str(epochs),
            "--batch-size", "8", "--res", "32", "--workers", "1", "--device", "cpu", *extra]


def test_one_writer_per_run_folder_and_store_even_through_a_symlink(setup, tmp_path, in_process):
    """A second `train` into a run folder in use, or a `label` into a store in use, is refused
    naming the holder's pid, also when it reaches the folder through a symlink (`--dry-run` too).
    The first `train` is another process; the others are this one, holding the lock by another handle."""
    from mealv2.common.store.locks import hold_lock
    from mealv2.common.store.label_store import acquire_writer_lock
    from mealv2.stage2_train.utils import RUN_LOCK

    _, data, teachers = setup
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "run_link").symlink_to(run)
    lock = hold_lock(run / RUN_LOCK, run, "train")
    try:
        for second in (run_cli(*hard_label_train(data, tmp_path / "run_link"), env=ONE_THREAD),
                       in_process(*hard_label_train(data, tmp_path / "run_link", "--dry-run"))):
            assert second.returncode == 2, second.stderr
            assert "being written by another `mealv2 train` process" in second.stderr
            assert f"pid {os.getpid()} on" in second.stderr
    finally:
        lock.release()
    assert not (run / "last.pt").exists()

    store = tmp_path / "store.zarr"
    (tmp_path / "store_link.zarr").symlink_to(store, target_is_directory=True)
    lock = acquire_writer_lock(store)
    try:
        second = in_process(*label_args(data, teachers, tmp_path / "store_link.zarr", rounds=1))
        assert second.returncode == 2 and "being written by another `mealv2 label` process" in second.stderr
        assert f"pid {os.getpid()} on" in second.stderr
    finally:
        lock.release()


def test_an_unwritable_out_is_refused_at_start_and_by_dry_run(setup, tmp_path, in_process):
    _, data, _ = setup
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for extra in ((), ("--dry-run",)):
        result = in_process(*hard_label_train(data, blocker / "run", *extra))
        assert result.returncode == 2
        assert f"--out {blocker / 'run'} cannot be written ({blocker} is a file, not a folder)" in result.stderr
        assert "epoch 0" not in result.stdout


def flip_byte(path, at=-6):
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_label_repairs_what_verify_finds_to_an_undamaged_runs_store(setup, reference, tmp_path, in_process):
    from mealv2.common.store.label_store import LabelStore

    """Chunks damaged, a damaged done mark and damaged image CRC32Cs: `verify` names them
    and the `mealv2 label` command that repairs them; that command, run as printed, labels exactly
    the damaged shards again, and the store equals the undamaged one."""
    import shlex
    import shutil

    _, data, _ = setup
    out = tmp_path / "store.zarr"
    shutil.copytree(reference, out)
    flip_chunk_byte(out, "ids", 1, 2)
    flip_chunk_byte(out, "probs", 0, 1)
    flip_chunk_byte(out, "crc32c", 0, 5)
    flip_byte(out / "paths/c/0")
    found = in_process("verify", str(out))
    assert found.returncode == 1
    for place in ("ids/c/1/0/0/0[2]: unreadable", "probs/c/0/0/0/0[1]: unreadable", "crc32c/c/0[5]: unreadable",
                  "paths/c/0: unreadable"):
        assert place in found.stderr
    flip_chunk_byte(out, "done", 2, 4)   # verify refuses to read such a store (test_bad_input); label repairs it
    command = found.stderr.split("repair: ", 1)[1].splitlines()[1].strip()
    args = [str(data) if w == "DATA" else w for w in shlex.split(command)[1:]]
    repaired = in_process(*args, "--workers", "1", "--device", "cpu")
    assert repaired.returncode == 0, repaired.stderr
    for line in ("done/c/2/0: damaged done mark", "ids/c/1/0/0/0[2]: damaged or missing; shard 2 of round(s) 1 ",
                 "probs/c/0/0/0/0[1]: damaged or missing; shard 1 of round(s) 0 ",
                 "crc32c/c/0[5]: damaged or missing; shard 5 of round(s) 0, 1, 2 ",
                 "paths/c/0: damaged or missing; rewritten"):
        assert f"repair: {line}" in repaired.stdout, repaired.stdout
    assert "3/3 rounds complete" in repaired.stdout
    assert_same_store(out, reference)
    assert LabelStore.open(out).relpaths() == LabelStore.open(reference).relpaths() is not None
    assert in_process("verify", str(out)).returncode == 0


def test_a_refused_append_changes_nothing_and_a_store_shrinks_to_its_complete_rounds(setup, reference, tmp_path,
                                                                                     in_process):
    """`label --rounds 4` on data whose image changed (same size, other bytes) is refused before the
    store grows, naming the file; a store left at 3/4 rounds (killed mid append) shrinks back with
    `--rounds 3` to the 3-round store, and not below its complete rounds."""
    import shutil

    _, data, teachers = setup
    changed = tmp_path / "data"
    shutil.copytree(data, changed)
    flip_byte(changed / "class_1" / "img_03.jpg", at=-40)   # in the scan data: decodes, at the same size
    out = tmp_path / "store.zarr"
    shutil.copytree(reference, out)
    refused = in_process(*label_args(changed, teachers, out, rounds=4))
    assert refused.returncode == 2, refused.stderr
    assert "1 image(s) changed since earlier rounds were labelled: class_1/img_03.jpg (CRC32C" in refused.stderr
    assert_same_store(out, reference)
    assert in_process("verify", str(out)).returncode == 0

    killed = run_cli(*label_args(data, teachers, out, rounds=4), env={**ONE_THREAD, "MEALV2_KILL_AT": "shard_mark:2"})
    assert killed.returncode == -signal.SIGKILL
    assert in_process("verify", str(out)).returncode == 1   # 3/4 rounds
    shrunk = in_process(*label_args(data, teachers, out, rounds=3))
    assert shrunk.returncode == 0, shrunk.stderr
    assert "3/3 rounds complete" in shrunk.stdout
    assert_same_store(out, reference)
    assert in_process("verify", str(out)).returncode == 0
    two = in_process(*label_args(data, teachers, out, rounds=2))
    assert two.returncode == 2 and "would drop some of its 3 complete rounds; pass --rounds 3" in two.stderr


def test_a_changed_dataset_is_named_by_path_and_verify_data_checks_the_images_bytes(setup, reference, tmp_path,
                                                                                     in_process):
    import shutil

    _, data, teachers = setup
    other = tmp_path / "other"
    shutil.copytree(data, other)
    (other / "class_0" / "img_03.jpg").unlink()
    shutil.copy(other / "class_1" / "img_03.jpg", other / "class_1" / "img_99.jpg")
    named = ("dataset changes since labelling: DATA lacks 1 image(s): class_0/img_03.jpg; "
             "DATA adds 1 image(s): class_1/img_99.jpg")
    for args in (label_args(other, teachers, reference, rounds=3), train_args(other, reference, tmp_path / "run", 1)):
        refused = in_process(*args)
        assert refused.returncode == 2 and named in refused.stderr, refused.stderr

    changed = tmp_path / "changed"
    shutil.copytree(data, changed)
    flip_byte(changed / "class_2" / "img_03.jpg", at=-40)
    found = in_process("verify", str(reference), "--data", str(changed), "--recompute", "2", "--device", "cpu")
    assert found.returncode == 1
    assert "1 image(s) changed since earlier rounds were labelled: class_2/img_03.jpg" in found.stderr


def test_a_full_disk_in_train_names_the_file_removes_the_temp_file_and_keeps_last_pt(setup, tmp_path, in_process):
    _, data, _ = setup
    run = tmp_path / "run"
    full = run_cli(*hard_label_train(data, run, epochs=2),
                   env={**ONE_THREAD, "MEALV2_DISK_FULL_AT": "checkpoint_bytes:2"})
    assert full.returncode == 2, full.stderr
    assert f"{run / 'last.pt'}: cannot write the checkpoint (No space left on device)" in full.stderr
    assert "MiB free, the checkpoint needs about" in full.stderr and "continue with --resume" in full.stderr
    assert "Traceback" not in full.stderr
    assert not [p.name for p in run.iterdir() if ".partial" in p.name], "temp file left behind"
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    resumed = in_process(*hard_label_train(data, run, "--resume", epochs=2))
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 2


def test_a_full_disk_in_label_names_the_store_and_the_same_command_resumes(setup, reference, tmp_path, in_process):
    _, data, teachers = setup
    out = tmp_path / "store.zarr"
    full = run_cli(*label_args(data, teachers, out), env={**ONE_THREAD, "MEALV2_DISK_FULL_AT": "chunk_write:2"})
    assert full.returncode == 2, full.stderr
    assert f"{out / 'staged' / 'ids'}: cannot write round 0 shard 0 of {out} (No space left on device;" in full.stderr
    assert "MiB free there); free some space and re-run the same command" in full.stderr
    resumed = in_process(*label_args(data, teachers, out))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_store(out, reference)


def test_ctrl_c_in_train_prints_the_resume_command(setup, tmp_path):
    import shlex
    import subprocess
    import sys
    import time

    _, data, _ = setup
    run = tmp_path / "run"
    args = hard_label_train(data, run, epochs=1000)
    proc = subprocess.Popen([sys.executable, "-m", "mealv2.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **ONE_THREAD})
    deadline = time.monotonic() + 120
    while not (run / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    # 130, or death by SIGINT when the interrupt lands in interpreter teardown: a shell shows both as 130
    assert proc.returncode in (130, -signal.SIGINT), err
    assert f"{run / 'last.pt'} holds the last finished epoch" in err
    # the continuation is the run's config printed as its command (tests/test_printed_commands.py runs one)
    (printed,) = [line for line in map(str.strip, err.splitlines()) if line.startswith("mealv2 train ")]
    words = shlex.split(printed)
    assert "--resume" in words and words[words.index("--out") + 1] == str(run)
    assert {"--hard-labels", "--epochs", "1000", "--res", "32"} <= set(words)
