"""The public label(config) / train(config): every refusal of the CLI is raised by the config in Python too,
and runs remember their flags (RUN/config.json): --resume needs none retyped and changes nothing untyped."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import mealv2
from mealv2.common.config import field_defaults, flag_name, word
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
    "teacher weights offline": (["--hard-labels", "--teacher-weights", "1,2"],
                                {"hard_labels": True, "teacher_weights": (1.0, 2.0)},
                                "--teacher-weights 1,2 weighs a store's per-teacher layers; it applies with --labels"),
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
                             batch_size=8, workers=1, device="cpu", progress=False, res=48)
    mealv2.train(cfg)
    (run / "config.json").unlink()
    resumed = mealv2.resume_config(run, epochs=2, progress=False)
    assert resumed.res == 48 and resumed.scale is None and resumed.resume
    assert [row["res"] for row in mealv2.train(resumed)] == [48, 48]
    # A change of the res given to resume_config is the run's to refuse, not dropped (the store's is 32 px).
    with pytest.raises(MealV2Error, match="student resolution: the run has 48 px, this command 32 px"):
        mealv2.train(mealv2.resume_config(run, epochs=3, res=32, dry_run=True))


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
    from mealv2.stage1_label.commands import label

    ctx = label.make_context("label", [str(files / "data"), "-o", "store", "-t", "x"])
    assert mealv2.LabelConfig(**ctx.params) == mealv2.LabelConfig(
        str(files / "data"), ["x"], "store")


def test_label_settings_a_store_records_are_the_stores_with_add_teacher_and_the_defaults_without():
    """Unset (None), what a store records is the store's with --add-teacher (add_teacher.store_settings refuses
    another value given) and, without it, the default `label --help` shows, filled in for the labeller."""
    import click

    from mealv2.stage1_label.commands import label

    defaults = {"rounds": 4, "crops_per_image": 4, "res": 224, "scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3),
                "topk": 10, "temperature": 1.0, "seed": 0, "shard_size": 1024}
    fresh = mealv2.LabelConfig("d", ["t"], "o")
    assert {name: getattr(fresh, name) for name in defaults} == defaults and fresh.crop == CropParams()
    grown = mealv2.LabelConfig("d", [], "o", add_teacher="t", topk=10)
    assert {name: getattr(grown, name) for name in defaults} == {**dict.fromkeys(defaults), "topk": 10}
    ctx = click.Context(label)
    helps = {p.name: " ".join(p.get_help_record(ctx)[1].split()) for p in label.params}   # as --help shows them
    for name, value in defaults.items():
        assert helps[name].endswith(f"[default: (the store's with --add-teacher, else {word(value)})]"), name


def parsed(command: str, args: list, monkeypatch):
    """The config `mealv2 COMMAND ARGS` builds and would run (its run function replaced)."""
    from mealv2.cli import cli

    built = []
    monkeypatch.setattr("mealv2.stage1_label.labeler.run_label", built.append)
    monkeypatch.setattr("mealv2.stage2_train.commands.run_train", built.append)
    cli.main([command, *map(str, args)], standalone_mode=False)
    return built[0]


@pytest.mark.parametrize("config", [mealv2.LabelConfig, mealv2.TrainConfig, CropParams])
def test_every_config_field_declares_what_it_takes(config):
    """The declaration each check and each flag's click type is built from (common/config.py)."""
    assert [f.name for f in dataclasses.fields(config) if "setting" not in f.metadata] == []


def every_field_set(configs) -> None:
    """Each field of the configs' class differs from its default in one of ``configs``: a round trip of them
    covers every flag."""
    defaults = field_defaults(type(configs[0]))
    unset = [f.name for f in dataclasses.fields(configs[0])
             if all(f.name in defaults and getattr(c, f.name) == defaults[f.name] for c in configs)]
    assert unset == []


def test_the_printed_command_of_a_config_builds_the_same_config(files, monkeypatch):
    """config_args(cfg), the command the demo prints for every Python call and a run for its continuation, parsed
    back by the real commands gives ``cfg`` again, for every field of LabelConfig and TrainConfig, and for a
    resumed run's config (`--resume` with the changes) too."""
    from mealv2.common.config import config_args
    from mealv2.stage2_train.utils import write_run_config

    names, data, run = str(files / "names.txt"), str(files / "data"), files / "run"
    label = mealv2.LabelConfig(data, ["x.pt", "y.pt*2"], str(files / "store"), rounds=2, crops_per_image=2,
                               res=32, scale=(0.35, 1.0), ratio=(0.5, 2.0), topk=3, temperature=2.0,
                               batch_size=8, seed=1, loader="torch", device="cpu", workers=3, shard_size=4,
                               skip_bad=True, classes_file=names, teacher_classes={1: names}, teacher_check=False,
                               teacher_precision="bf16", keep_teachers=True, dry_run=True, progress=False,
                               write_depth=0)
    online = mealv2.TrainConfig(
        data, str(run), "a", teachers=["x.pt", "y.pt*2"], classes_file=names, teacher_classes={2: names},
        teacher_check=False, teacher_precision="bf16", temperature=2.0, res=32, scale=(0.35, 1.0),
        ratio=(3 / 4, 4 / 3), crops_per_image=2, min_res=16, ramp_start=0, ramp_end=1, res_step=8, epochs=3,
        batch_size=8, lr=0.2, momentum=0.8, wd=1e-4, opt="adamw", lr_step=2, cos=True, warmup_epochs=1,
        use_discriminator_loss=True, d_lr=0.02, hard_label_weight=0.25, w_cutmix=True, cutmix_alpha=0.5,
        cutmix_prob=0.5, mixup=0.2,
        model_ema=True, model_ema_decay=0.99, val=data, init=str(files / "w.pt"), loader="torch", device="cpu",
        workers=3, seed=5, compile=True, tensorboard=True, dry_run=True, progress=False)
    stored = mealv2.TrainConfig(data, str(run), "a", labels=str(files), res=48, pretrained=True,
                                teacher_weights=(2, 0, 0.5))
    hard = mealv2.TrainConfig(data, str(run), "a", hard_labels=True, workers=2)
    run.mkdir()
    write_run_config(run, hard, {})
    resumed = mealv2.resume_config(run, epochs=5, res=64, workers=1)
    grown = mealv2.LabelConfig(data, [], str(files / "store"), add_teacher="z.pt@32", topk=3)   # given: printed
    every_field_set([label, grown])
    every_field_set([online, stored, hard, resumed])
    for command, cfg in (("label", label), ("label", grown), ("train", online), ("train", stored), ("train", hard),
                         ("train", resumed)):
        assert parsed(command, config_args(cfg), monkeypatch) == cfg, config_args(cfg)


def number_cases():
    """(command, config class, field, flag, bad value) for each number a config takes: just outside its range
    at each bound, and a fraction where it takes integers."""
    from mealv2.common.config import Number, OrNone

    fields = [("label", mealv2.LabelConfig, f) for f in dataclasses.fields(mealv2.LabelConfig)]
    fields += [("train", mealv2.TrainConfig, f) for f in dataclasses.fields(mealv2.TrainConfig)]
    for command, config, f in fields:
        kind = f.metadata["setting"]
        kind = kind.inner if isinstance(kind, OrNone) else kind
        if not isinstance(kind, Number):
            continue
        bounds = ([kind.min if kind.min_open else kind.min - 1] if kind.min is not None else []) + (
            [kind.max if kind.max_open else kind.max + 1] if kind.max is not None else [])
        values = [kind.type(v) for v in bounds] + ([1.5] if kind.type is int else [])
        yield from ((command, config, f.name, v) for v in values)


NUMBERS = list(number_cases())


@pytest.mark.parametrize("command, config, name, value", NUMBERS,
                         ids=[f"{c} {n} {v}" for c, _, n, v in NUMBERS])
def test_a_number_a_flag_refuses_is_refused_by_the_config_in_the_same_words(command, config, name, value, files,
                                                                            mealv2_cli):
    """Ranges and types are declared once, on the config's field: the config and the flag say the same."""
    base = {mealv2.LabelConfig: {"data": "d", "teachers": ["t"], "out": "o"},
            mealv2.TrainConfig: {"data": "d", "out": "o", "arch": "a", "hard_labels": True}}[config]
    with pytest.raises(MealV2Error) as refused_in_python:
        config(**base, **{name: value})
    said = str(refused_in_python.value).split(f"{name} = ", 1)[1]
    assert said.startswith(f"{value!r} is ")
    extra = ["-t", "t"] if command == "label" else ["-a", "a", "--hard-labels"]
    r = mealv2_cli(command, files / "data", "-o", files / "o", *extra, flag_name(name), value)
    refused(r, f"Invalid value for '{flag_name(name)}': {said}")


# (config, fields, what the refusal says): values of the wrong type or out of the choices, and URLs where a
# local path is meant, each accepted until the run once (a store left as X.zarr.creating, a run folder ./s3:/...)
BAD_VALUES = [
    ("train", {"epochs": 1.5}, "train: epochs = 1.5 is not an integer; expected an integer >= 1"),
    ("label", {"rounds": 2.5}, "label: rounds = 2.5 is not an integer; expected an integer >= 1"),
    ("train", {"batch_size": 20.7}, "train: batch_size = 20.7 is not an integer"),
    ("train", {"device": "gpu"}, "train: device = 'gpu' is not a choice; expected one of 'auto', 'cpu', 'cuda'"),
    ("label", {"teacher_precision": "fp8"}, ("label: teacher_precision = 'fp8' is not a choice; expected one of "
                                             "'fp32', 'tf32', 'bf16', 'fp16'")),
    ("label", {"write_depth": -1}, "label: write_depth = -1 is out of range; expected an integer >= 0"),
    ("train", {"lr": "0.1"}, "train: lr = '0.1' is not a number; expected a finite number >= 0"),
    ("train", {"labels": 5, "hard_labels": False}, "train: labels = 5 is not a path"),
    ("train", {"hard_labels": "no"}, "train: hard_labels = 'no' is not a bool; expected True or False"),
    ("train", {"teachers": "a=b@32", "hard_labels": False}, "train: teachers = 'a=b@32' is a string, not a list"),
    ("label", {"teachers": "a=b@32"}, "label: teachers = 'a=b@32' is a string, not a list"),
    ("train", {"res": 1.5}, "train: res = 1.5 is not an integer"),
    ("train", {"scale": (0.5, 0.4)}, "--scale must satisfy 0 < min <= max <= 1, got 0.5,0.4"),
    ("train", {"out": "s3://bkt/run"}, "train: out = s3://bkt/run is a URL; here mealv2 takes a local path"),
    ("train", {"val": "http://host/val"}, "train: val = http://host/val is a URL; here mealv2 takes a local path"),
    ("train", {"data": "s3://bkt/train"}, "train: data = s3://bkt/train is a URL"),
    ("label", {"data": "gs://bkt/train"}, "label: data = gs://bkt/train is a URL"),
    ("label", {"out": "http://host/s.zarr"}, "label: out = http://host/s.zarr: stores are written to a local path"),
    ("label", {"out": "s3:/bkt/s.zarr"}, "label: out = s3:/bkt/s.zarr reads as a local folder named 's3:', likely a "
                                         "mistyped URL; write s3://bkt/s.zarr for the URL, or ./s3:/bkt/s.zarr"),
    ("train", {"labels": "S3:bkt/s.zarr", "hard_labels": False}, "likely a mistyped URL; write S3://bkt/s.zarr"),
]


@pytest.mark.parametrize("command, fields, message", BAD_VALUES, ids=[str(f) for _, f, _ in BAD_VALUES])
def test_a_value_of_the_wrong_type_or_place_is_refused_when_the_config_is_made(command, fields, message, tmp_path,
                                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, base = {"label": (mealv2.LabelConfig, {"data": "d", "teachers": ["t"], "out": "o"}),
                    "train": (mealv2.TrainConfig, {"data": "d", "out": "o", "arch": "a", "hard_labels": True})}[command]
    with pytest.raises(MealV2Error, match=re.escape(message)):
        config(**{**base, **fields})
    assert list(tmp_path.iterdir()) == []


def test_a_run_recorded_before_the_crop_settings_were_fields_resumes_with_its_crops(files):
    """Runs once recorded a whole ``crop`` and the crop flags typed (``crop_given``): a fresh-crop run's crops
    were all its own, a stored-label run's only those typed (the rest were the store's)."""
    crop = {"res": 48, "scale": [0.35, 1.0], "ratio": [0.75, 4 / 3], "flip_prob": 0.5, "interpolation": "bilinear"}
    old = {"data": str(files / "data"), "arch": "a", "crop": crop, "crops_per_image": 2, "epochs": 3}
    for name, settings, expected in (
            ("hard", {"hard_labels": True, "crop_given": []}, (48, (0.35, 1.0), (0.75, 4 / 3), 2)),
            ("stored", {"labels": str(files), "crop_given": ["res"]}, (48, None, None, None))):
        run = files / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"settings": {**old, **settings}, "resolved": {}}))
        cfg = mealv2.resume_config(run)
        assert (cfg.res, cfg.scale, cfg.ratio, cfg.crops_per_image) == expected, name
