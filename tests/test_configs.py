"""The public label(config) / train(config): every refusal of the CLI is raised by the config in Python too,
and runs remember their flags (RUN/config.json): --resume needs none retyped and changes nothing untyped."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import mealv2
from mealv2.common.data.crops import CropParams
from mealv2.common.errors import MealV2Error
from mealv2.common.data.targets import reconstruct_targets
from test_bad_input import mealv2 as mealv2_cli, refused  # noqa: F401 (a fixture: mealv2 ARGS in this process)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = ["--device", "cpu", "--workers", "1", "--batch-size", "8"]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "names.txt").write_text("a\nb\n")
    (tmp_path / "w.pt").write_bytes(b"")
    return tmp_path


# (CLI arguments after `train DATA -o RUN`, TrainConfig fields, the refusal both name)
TRAIN_REFUSALS = {
    "no label source": ([], {}, "give exactly one of --labels STORE, --hard-labels, --teachers SPEC"),
    "two label sources": (["--hard-labels", "-t", "resnet18"], {"hard_labels": True, "teachers": ["resnet18"]},
                          "give exactly one of"),
    "discriminator on hard labels": (["--hard-labels", "--use-discriminator-loss"],
                                     {"hard_labels": True, "use_discriminator_loss": True},
                                     "--use-discriminator-loss needs soft targets"),
    "temperature offline": (["--hard-labels", "--temperature", 2], {"hard_labels": True, "temperature": 2.0},
                            "--temperature 2 applies to online mode (--teachers) only"),
    "classes offline": (["--hard-labels", "--classes", "{files}/names.txt"],
                        {"hard_labels": True, "classes_file": "{files}/names.txt"},
                        "--classes {files}/names.txt applies to online mode"),
    "teacher classes offline": (["--hard-labels", "--teacher-classes", "1={files}/names.txt"],
                                {"hard_labels": True, "teacher_classes": {1: "{files}/names.txt"}},
                                "--teacher-classes 1={files}/names.txt applies to online mode"),
    "teacher precision offline": (["--hard-labels", "--teacher-precision", "bf16"],
                                  {"hard_labels": True, "teacher_precision": "bf16"},
                                  "--teacher-precision bf16 applies to online mode"),
    "pretrained and init": (["--hard-labels", "--pretrained", "--init", "{files}/w.pt"],
                            {"hard_labels": True, "pretrained": True, "init": "{files}/w.pt"},
                            "--pretrained and --init both set the starting weights"),
    "no arch": (["--hard-labels", "-a", ""], {"hard_labels": True, "arch": ""}, "--arch is missing"),
}


def _fill(value, files):
    if isinstance(value, str):
        return value.format(files=files)
    if isinstance(value, dict):
        return {k: _fill(v, files) for k, v in value.items()}
    return value


@pytest.mark.parametrize("case", TRAIN_REFUSALS)
def test_every_train_refusal_of_the_cli_is_the_configs(case, files, mealv2_cli):
    args, fields, message = TRAIN_REFUSALS[case]
    message = _fill(message, files)
    r = mealv2_cli("train", files / "data", "-o", files / "run", "-a", "test_resnet",
                   *[_fill(a, files) for a in args])
    refused(r, message)
    with pytest.raises(MealV2Error, match=re.escape(message)):
        mealv2.TrainConfig(**{"data": str(files / "data"), "out": str(files / "run"), "arch": "test_resnet",
                              **_fill(fields, files)})


def test_the_cli_needs_data_and_out_as_the_config_does(files, mealv2_cli):
    refused(mealv2_cli("train", "-o", files / "run", "-a", "x", "--hard-labels"), "DATA is missing")
    refused(mealv2_cli("train", files / "data", "-a", "x", "--hard-labels"), "--out is missing")
    for fields, message in (({"data": ""}, "DATA is missing"), ({"out": ""}, "--out is missing")):
        with pytest.raises(MealV2Error, match=message):
            mealv2.TrainConfig(**{"data": "d", "out": "o", "arch": "a", "hard_labels": True, **fields})


def test_label_without_teachers_is_refused_by_cli_and_config(files, mealv2_cli):
    refused(mealv2_cli("label", files / "data", "-t", ",", "-o", files / "store"), "no teachers given")
    with pytest.raises(MealV2Error, match="no teachers given"):
        mealv2.LabelConfig(data=str(files / "data"), teachers=[], out=str(files / "store"))


def test_the_public_api_lists_the_stages():
    for name in ("label", "LabelConfig", "train", "TrainConfig", "resume_config"):
        assert name in mealv2.__all__ and getattr(mealv2, name).__doc__, name
    assert "Args:" in mealv2.train.__doc__ and "Args:" in mealv2.resume_config.__doc__


def test_a_resume_takes_every_setting_from_the_run(labelled, tmp_path, mealv2_cli):
    """The run's store is at 32 px and --res is not typed: resumed with only --epochs, it keeps its
    res, lr and discriminator; a typed setting that would change the run is refused, naming it."""
    run = tmp_path / "run"
    r = mealv2_cli("train", labelled.data, "--labels", labelled.store, "-a", "test_resnet", "-o", run, "--epochs", 1,
                   "--lr", 0.05, "--use-discriminator-loss", *FAST)
    assert r.code == 0, r.err
    written = json.loads((run / "config.json").read_text())
    assert written["settings"]["lr"] == 0.05 and written["settings"]["momentum"] == 0.9   # typed and default
    assert written["resolved"]["student_res"] == [32] and written["resolved"]["store"]["path"] == str(labelled.store)
    assert written["resolved"]["crops_per_image"] == 2 and written["resolved"]["topk"] == 2

    r = mealv2_cli("train", "--resume", run, "--lr", 0.1)
    refused(r, "lr: the run has 0.05, this command 0.1")
    r = mealv2_cli("train", "--resume", run, "--epochs", 2, "--workers", 1)
    assert r.code == 0, r.err
    assert f"resuming {run / 'last.pt'} at epoch 1" in r.out
    settings = json.loads((run / "config.json").read_text())["settings"]
    assert settings == {**written["settings"], "epochs": 2, "resume": True}
    assert mealv2.resume_config(run).use_discriminator_loss and mealv2.resume_config(run).lr == 0.05

    # --resume with --out names the same run; --res typed differently from the run's 32 px is refused.
    refused(mealv2_cli("train", "-o", run, "--resume", "--epochs", 3, "--res", 48, "--dry-run"),
            "student resolution: the run has 32 px, this command 48 px")
    refused(mealv2_cli("train", "-o", tmp_path / "other", "--resume", run), "name two runs")


def test_a_run_without_config_json_resumes_from_its_checkpoint(labelled, tmp_path):
    run = tmp_path / "old"
    cfg = mealv2.TrainConfig(str(labelled.data), str(run), "test_resnet", labels=str(labelled.store), epochs=1,
                             batch_size=8, workers=1, device="cpu", progress=False, crop=CropParams(res=48),
                             crop_given=("res",))
    mealv2.train(cfg)
    (run / "config.json").unlink()
    resumed = mealv2.resume_config(run, epochs=2, progress=False)
    assert resumed.crop.res == 48 and resumed.crop_given == ("res",) and resumed.resume
    assert [row["res"] for row in mealv2.train(resumed)] == [48, 48]


def test_the_store_docs_plain_zarr_reader_matches_mealv2s(labelled):
    """docs/STORE.md's sample reader, run as written against a store made by `mealv2 label`."""
    text = (Path(__file__).parents[1] / "docs" / "STORE.md").read_text()
    code = text.split("## Reading a store with plain zarr")[1].split("```python\n")[1].split("```")[0]
    scope = {}
    exec(code.replace('"STORE"', repr(str(labelled.store))), scope)
    ids, codes = scope["ids"], scope["codes"]
    ours = reconstruct_targets(torch.as_tensor(ids.reshape(-1, ids.shape[-1])),
                               torch.as_tensor(codes.reshape(-1, codes.shape[-1]).astype(np.uint8)),
                               len(scope["a"]["classes"]))
    assert scope["target"].shape == (*ids.shape[:2], len(scope["a"]["classes"]))
    np.testing.assert_allclose(scope["target"].reshape(ours.shape), ours.double().numpy(), atol=1e-6)


def test_the_train_commands_untyped_flags_are_the_configs_defaults(files):
    """Click's option defaults and TrainConfig's must agree: an untyped flag means the config's default."""
    from mealv2.stage2_train.commands import train
    from mealv2.stage2_train.run_config import config_from_flags

    ctx = train.make_context("train", [str(files / "data"), "-o", "run", "-a", "test_resnet", "--hard-labels"])
    assert config_from_flags(ctx.params, {"data", "out", "arch", "hard_labels"}) == mealv2.TrainConfig(
        str(files / "data"), "run", "test_resnet", hard_labels=True)


def test_config_args_is_the_command_that_builds_the_same_config(files):
    """The demo's report prints config_args(cfg) for every Python call: click parses it back to cfg."""
    from click.core import ParameterSource

    from mealv2.cli.options import config_args
    from mealv2.stage2_train.commands import train
    from mealv2.stage2_train.run_config import config_from_flags

    names = files / "names.txt"
    for cfg in (mealv2.TrainConfig(str(files / "data"), "run", "a", teachers=["x.pt", "y.pt*2"], teacher_check=False,
                                   crop=CropParams(res=32, ratio=(3 / 4, 4 / 3)), lr=0.2, cos=True, workers=3,
                                   crop_given=("res", "scale", "crops_per_image"), teacher_classes={1: str(names)}),
                mealv2.TrainConfig(str(files / "data"), "run", "a", labels=str(files), crop_given=("res",))):
        ctx = train.make_context("train", config_args(cfg))
        typed = {n for n in ctx.params if ctx.get_parameter_source(n) is not ParameterSource.DEFAULT}
        assert config_from_flags(ctx.params, typed) == cfg


def _ranged_options(command):
    """(command name, flag name, a value just outside the option's range) of each ranged option."""
    import click

    from mealv2.stage1_label.commands import label
    from mealv2.stage2_train.commands import train

    cmd = {"label": label, "train": train}[command]
    for p in cmd.params:
        if isinstance(p.type, click.types._NumberRangeBase) and p.type.min is not None:
            yield p.name, p.opts[0], p.type.min if p.type.min_open else p.type.min - 1
        if isinstance(p.type, click.types._NumberRangeBase) and p.type.max is not None:
            yield p.name, p.opts[0], p.type.max + 1


RANGED = [(command, *option) for command in ("label", "train") for option in _ranged_options(command)]


@pytest.mark.parametrize("command, name, flag, value", RANGED, ids=[f"{c} {f} {v}" for c, _, f, v in RANGED])
def test_every_out_of_range_flag_is_refused_by_the_config_too(command, name, flag, value, files, mealv2_cli):
    """The same value the CLI refuses (click's range) is refused by LabelConfig / TrainConfig, naming it."""
    base = ({"data": "d", "teachers": ["t"], "out": "o"} if command == "label" else
            {"data": "d", "out": "o", "arch": "a", "hard_labels": True})
    if name == "temperature" and command == "train":
        base = {**base, "hard_labels": False, "teachers": ["t"]}
    config = mealv2.LabelConfig if command == "label" else mealv2.TrainConfig
    with pytest.raises(MealV2Error, match=re.escape(f"{name} = {value!r} is out of range")
                       if name != "res" else "--res must be a positive pixel count"):
        config(**base, **({"crop": CropParams(res=value)} if name == "res" else {name: value}))
    extra = ["-t", "t"] if command == "label" else ["-a", "a", "--hard-labels"]
    r = mealv2_cli(command, files / "data", "-o", files / "o", *extra, flag, value)
    refused(r, flag)
    assert "Invalid value" in r.err, r.err
