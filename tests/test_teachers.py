"""Teacher specs and the one rule for a teacher's input: ARCH=CKPT in timm / MEAL V2 wrappers,
mealv2 checkpoints, timm names; @RES, %NORM, *W; class order by name; errors."""
from __future__ import annotations

import re

import pytest
import timm
import torch

from mealv2.common.models.checkpoints import ModelSpecError, save_checkpoint, state_dict_sha256
from mealv2.common.models.teachers import Spec, load_teacher, split_specs, teacher_table

CLASSES = ("class_0", "class_1", "class_2")


def _state(arch: str = "test_resnet", num_classes: int = 3, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return timm.create_model(arch, num_classes=num_classes).state_dict()


def _same_weights(model: torch.nn.Module, state: dict) -> bool:
    own = model.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[k], state[k]) for k in own)


@pytest.fixture(scope="module")
def resnet_state():
    return _state()


def test_arch_equals_checkpoint_with_res_and_weight(tmp_path, resnet_state):
    path = tmp_path / "r.pth"
    torch.save(resnet_state, path)
    t = load_teacher(f"test_resnet={path}@32*2.5", CLASSES, res=64)
    assert (t.arch, t.res, t.weight, t.spec) == ("test_resnet", 32, 2.5, f"test_resnet={path}@32*2.5")
    assert _same_weights(t.model, resnet_state)
    assert not t.model.training
    assert t.sha256 == state_dict_sha256(t.model) and len(t.sha256) == 64


def test_a_state_dict_runs_at_the_commands_res_with_imagenet_normalisation(tmp_path):
    """Nothing in a state dict says how it was trained: not timm's config of its architecture
    (test_efficientnet's is 160 px, 0.5 / 0.5 for test_resnet), but --res and ImageNet mean/std."""
    for arch in ("test_resnet", "test_efficientnet"):
        path = tmp_path / f"{arch}.pth"
        torch.save(_state(arch), path)
        t = load_teacher(f"{arch}={path}", CLASSES, res=32)
        assert (t.res, t.res_from, t.weight) == (32, "--res", 1.0)
        assert (t.mean, t.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        assert t.norm_from == "default for state dicts; %NORM states another"
    with pytest.raises(ModelSpecError, match="does not record its resolution; append @RES"):
        load_teacher(f"test_resnet={tmp_path / 'test_resnet.pth'}", CLASSES)


@pytest.mark.parametrize("norm, mean, std", [
    ("imagenet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ("0.5", (0.5,) * 3, (0.5,) * 3),
    ("inception", (0.5,) * 3, (0.5,) * 3), ("none", (0.0,) * 3, (1.0,) * 3),
    ("clip", (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ("0.1:0.2:0.3/0.4:0.5:0.6", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)), ("0.45/0.25", (0.45,) * 3, (0.25,) * 3),
    ("timm", (0.5,) * 3, (0.5,) * 3),   # timm's pretrained config of test_resnet
])
def test_norm_suffix_states_the_mean_and_std(tmp_path, resnet_state, norm, mean, std):
    path = tmp_path / "r.pth"
    torch.save(resnet_state, path)
    for spec in (f"test_resnet={path}%{norm}", f"test_resnet={path}@40%{norm}*2", f"test_resnet={path}*2%{norm}@40"):
        t = load_teacher(spec, CLASSES, res=32)
        assert t.mean == pytest.approx(mean) and t.std == pytest.approx(std), spec
        assert t.norm_from == f"%{norm}"
    assert (t.res, t.weight) == (40, 2.0)


@pytest.mark.parametrize("norm", ["imagenett", "0.1:0.2/0.3", "0.5/0", "a/b", "nan/0.5", "0.5/inf", "0.5:nan:0.5/1"])
def test_bad_norm_is_named(norm):
    with pytest.raises(ModelSpecError, match=f"normalisation '%{norm}'"):
        Spec.parse(f"test_resnet=x.pth%{norm}")


@pytest.mark.parametrize("suffix, expected", [
    ("@abc", "an integer from 1 to 4096"), ("@0", "an integer from 1 to 4096"),
    ("@100000", "an integer from 1 to 4096"), ("@-5", "an integer from 1 to 4096"),
    ("*-1", "a finite number > 0"), ("*inf", "a finite number > 0"), ("*nan", "a finite number > 0"),
    ("*0", "a finite number > 0"), ("*abc", "a finite number > 0"), ("@64*", "a finite number > 0"),
])
def test_bad_suffix_is_named_not_taken_for_a_file(tmp_path, resnet_state, suffix, expected):
    """Once '@abc' was a missing file, '@100000' a DALI bad_alloc and '*-1' part of the path."""
    path = tmp_path / "r.pth"
    torch.save(resnet_state, path)
    bad = suffix.rsplit("*", 1)[-1] if suffix.startswith("@64*") else None
    named = f"'*{bad}'" if bad is not None else f"'{suffix}'"
    with pytest.raises(ModelSpecError, match=rf"teacher spec 'test_resnet={path}{re.escape(suffix)}': suffix "
                                             rf"{re.escape(named)}: expected .*{re.escape(expected)}"):
        load_teacher(f"test_resnet={path}{suffix}", CLASSES, res=32)


def test_suffix_marks_inside_an_existing_file_name_stay_in_it(tmp_path, resnet_state):
    path = tmp_path / "r@v2*best.pth"
    torch.save(resnet_state, path)
    assert Spec.parse(f"test_resnet={path}").body == f"test_resnet={path}"
    t = load_teacher(f"test_resnet={path}@40*2", CLASSES, res=32)
    assert (t.res, t.weight) == (40, 2.0)


def test_a_suffix_given_twice_is_refused():
    with pytest.raises(ModelSpecError, match="res given twice"):
        Spec.parse("test_resnet=x.pth@32@64")


def test_teacher_table_names_res_norm_weight_params_and_other_resolutions(tmp_path, resnet_state):
    path = tmp_path / "r.pth"
    torch.save(resnet_state, path)
    a = load_teacher(f"test_resnet={path}%0.5", CLASSES, res=32)
    b = load_teacher(f"test_resnet={path}@48*2", CLASSES, res=32)
    table = teacher_table([a, b], 32)
    assert "32 px (--res)" in table and "48 px (@RES)" in table and "weight 2" in table
    assert "mean/std 0.5" in table and "(%0.5)" in table and "mean/std imagenet" in table
    assert f"{a.num_params / 1e6:.2f}M params" in table and "state dict" in table
    assert "not at --res 32: teacher 2 (test_resnet) at 48 px" in table


def test_state_dict_classes_map_outputs_by_name(tmp_path, resnet_state):
    """--classes: the teacher's outputs in its own order; logits come back in the dataset's."""
    path = tmp_path / "r.pth"
    torch.save(resnet_state, path)
    own_order = ["class_2", "class_0", "class_1"]
    t = load_teacher(f"test_resnet={path}", CLASSES, res=32, state_dict_classes=own_order)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        raw, mapped = t.model(x), t.logits(x)
    for j, name in enumerate(CLASSES):
        torch.testing.assert_close(mapped[:, j], raw[:, own_order.index(name)])
    with pytest.raises(ModelSpecError, match=r"the model lacks \['class_2'\].*the dataset lacks \['zebra'\]"):
        load_teacher(f"test_resnet={path}", CLASSES, res=32, state_dict_classes=["class_0", "class_1", "zebra"])


def test_a_timm_name_with_another_class_count_is_refused_before_any_download(monkeypatch):
    """timm would silently give the pretrained model a random head for 3 classes."""
    import mealv2.common.models.teachers as teachers

    def no_download(*a, **k):
        raise AssertionError("asked timm for weights")

    monkeypatch.setattr(teachers, "create_timm_model", no_download)
    with pytest.raises(ModelSpecError, match=r"timm's pretrained weights have 1000 classes, the dataset has 3"):
        load_teacher("resnet18", CLASSES)


@pytest.mark.parametrize("wrap", ["module", "state_dict", "model", "state_dict+module"])
def test_meal_v2_and_wrapped_state_dicts_load_to_the_same_weights(tmp_path, resnet_state, wrap):
    obj = resnet_state
    if "module" in wrap:
        obj = {f"module.{k}": v for k, v in obj.items()}
    if wrap.startswith("state_dict"):
        obj = {"state_dict": obj, "epoch": 3, "arch": "resnet"}
    elif wrap == "model":
        obj = {"model": obj, "optimizer": {}}
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    t = load_teacher(f"test_resnet={path}", CLASSES, res=32)
    assert _same_weights(t.model, resnet_state)
    plain = tmp_path / "plain.pth"
    torch.save(resnet_state, plain)
    assert t.sha256 == load_teacher(f"test_resnet={plain}", CLASSES, res=32).sha256


def test_sha256_tells_weights_apart(tmp_path):
    for seed in (0, 1):
        torch.save(_state(seed=seed), tmp_path / f"{seed}.pth")
    a = load_teacher(f"test_resnet={tmp_path / '0.pth'}", CLASSES, res=32)
    b = load_teacher(f"test_resnet={tmp_path / '1.pth'}", CLASSES, res=32)
    assert a.sha256 != b.sha256


def test_mealv2_checkpoint_records_arch_classes_res_and_normalisation(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_convnext", num_classes=3)
    path = tmp_path / "student.pt"
    save_checkpoint(path, model=model, arch="test_convnext", classes=CLASSES, res=48,
                    mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), epoch=7)
    t = load_teacher(str(path), CLASSES, res=224)   # the checkpoint's record wins over --res
    assert (t.arch, t.res, t.mean, t.std) == ("test_convnext", 48, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert (t.res_from, t.norm_from, t.index) == ("checkpoint", "checkpoint", None)
    assert _same_weights(t.model, model.state_dict())
    assert load_teacher(f"{path}@64*3", CLASSES).res == 64
    assert load_teacher(f"{path}@64*3", CLASSES).weight == 3.0
    # the same classes in another folder order are mapped by name
    assert load_teacher(str(path), ("class_1", "class_2", "class_0")).index.tolist() == [1, 2, 0]
    # a checkpoint of other classes is refused, naming both
    with pytest.raises(ModelSpecError, match=r"has 3 classes.*the dataset has 4.*the model lacks \['class_3'\]"):
        load_teacher(str(path), CLASSES + ("class_3",))
    with pytest.raises(ModelSpecError, match="class_x"):
        load_teacher(str(path), ("class_0", "class_1", "class_x"))


def test_wrong_class_count_names_the_shapes(tmp_path):
    path = tmp_path / "five.pth"
    torch.save(_state(num_classes=5), path)
    with pytest.raises(ModelSpecError) as e:
        load_teacher(f"test_resnet={path}", CLASSES, res=32)
    msg = str(e.value)
    assert "fc.weight" in msg and "(5, " in msg and "(3, " in msg and "3 classes" in msg


def test_missing_key_is_named(tmp_path, resnet_state):
    state = dict(resnet_state)
    del state["fc.bias"]
    path = tmp_path / "cut.pth"
    torch.save(state, path)
    with pytest.raises(ModelSpecError, match=r"missing keys \['fc.bias'\]"):
        load_teacher(f"test_resnet={path}", CLASSES, res=32)


def test_other_architectures_weights_are_refused(tmp_path):
    path = tmp_path / "conv.pth"
    torch.save(_state("test_convnext"), path)
    with pytest.raises(ModelSpecError, match="does not fit the architecture|has shape"):
        load_teacher(f"test_resnet={path}", CLASSES, res=32)


def test_non_timm_name_is_refused(tmp_path, resnet_state):
    with pytest.raises(ModelSpecError, match="'resnet_nonexistent_7' is not a timm model name"):
        load_teacher("resnet_nonexistent_7", CLASSES)
    path = tmp_path / "r.pth"
    torch.save(resnet_state, path)
    with pytest.raises(ModelSpecError, match="'nope_arch' is not a timm model name"):
        load_teacher(f"nope_arch={path}", CLASSES)


def test_missing_checkpoint_file_is_named(tmp_path):
    missing = tmp_path / "absent.pth"
    with pytest.raises(ModelSpecError, match=f"{missing}.*does not exist"):
        load_teacher(f"test_resnet={missing}@32", CLASSES)
    with pytest.raises(ModelSpecError, match=f"file {missing} does not exist"):
        load_teacher(str(missing), CLASSES)


def test_unreadable_or_foreign_files_are_refused(tmp_path, resnet_state):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelSpecError, match="cannot read checkpoint"):
        load_teacher(f"test_resnet={junk}", CLASSES)
    plain = tmp_path / "plain.pth"
    torch.save(resnet_state, plain)
    with pytest.raises(ModelSpecError, match=f"not a mealv2 checkpoint; for a timm or MEAL V2 state dict write ARCH={plain}"):
        load_teacher(str(plain), CLASSES)
    notdict = tmp_path / "list.pth"
    torch.save([1, 2, 3], notdict)
    with pytest.raises(ModelSpecError, match="not a state dict"):
        load_teacher(f"test_resnet={notdict}", CLASSES)


def test_zero_weight_is_refused(tmp_path, resnet_state):
    path = tmp_path / "r.pth"
    torch.save(resnet_state, path)
    with pytest.raises(ModelSpecError, match=r"suffix '\*0': expected the teacher's ensemble weight, a finite "
                                             r"number > 0"):
        load_teacher(f"test_resnet={path}*0", CLASSES)


def test_teachers_option_is_repeatable_and_comma_separated():
    assert split_specs(("a=x.pth@32,b*2", " c ", "d@380*0.5,")) == ["a=x.pth@32", "b*2", "c", "d@380*0.5"]
