"""Teacher specs: ARCH=CKPT in timm / MEAL V2 wrappers, mealv2 checkpoints, @RES, *W, errors."""
from __future__ import annotations

import timm
import torch
import pytest

from mealv2.common.models import (ModelSpecError, load_teacher, save_checkpoint, split_specs,
                                  state_dict_sha256)

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
    t = load_teacher(f"test_resnet={path}@32*2.5", CLASSES)
    assert (t.arch, t.res, t.weight, t.spec) == ("test_resnet", 32, 2.5, f"test_resnet={path}@32*2.5")
    assert _same_weights(t.model, resnet_state)
    assert not t.model.training
    # mean/std come from timm's pretrained config of the architecture
    assert t.mean == (0.5, 0.5, 0.5) and t.std == (0.5, 0.5, 0.5)
    assert t.sha256 == state_dict_sha256(t.model) and len(t.sha256) == 64


def test_defaults_without_suffixes_come_from_timm(tmp_path):
    state = _state("test_efficientnet")
    path = tmp_path / "e.pth"
    torch.save(state, path)
    t = load_teacher(f"test_efficientnet={path}", CLASSES)
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("test_efficientnet", num_classes=3))
    assert t.res == cfg["input_size"][-1] and t.weight == 1.0
    assert t.mean == tuple(cfg["mean"]) and t.std == tuple(cfg["std"])
    assert t.mean != (0.5, 0.5, 0.5)  # its own normalisation, not test_resnet's


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
    t = load_teacher(f"test_resnet={path}", CLASSES)
    assert _same_weights(t.model, resnet_state)
    plain = tmp_path / "plain.pth"
    torch.save(resnet_state, plain)
    assert t.sha256 == load_teacher(f"test_resnet={plain}", CLASSES).sha256


def test_sha256_tells_weights_apart(tmp_path):
    for seed in (0, 1):
        torch.save(_state(seed=seed), tmp_path / f"{seed}.pth")
    a = load_teacher(f"test_resnet={tmp_path / '0.pth'}", CLASSES)
    b = load_teacher(f"test_resnet={tmp_path / '1.pth'}", CLASSES)
    assert a.sha256 != b.sha256


def test_mealv2_checkpoint_records_arch_classes_res_and_normalisation(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_convnext", num_classes=3)
    path = tmp_path / "student.pt"
    save_checkpoint(path, model=model, arch="test_convnext", classes=CLASSES, res=48,
                    mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), epoch=7)
    t = load_teacher(str(path), CLASSES)
    assert (t.arch, t.res, t.mean, t.std) == ("test_convnext", 48, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert _same_weights(t.model, model.state_dict())
    assert load_teacher(f"{path}@64*3", CLASSES).res == 64
    assert load_teacher(f"{path}@64*3", CLASSES).weight == 3.0
    # a checkpoint of other classes is refused, naming both
    with pytest.raises(ModelSpecError, match=r"trained on 3 classes.*dataset has 4 classes"):
        load_teacher(str(path), CLASSES + ("class_3",))
    with pytest.raises(ModelSpecError, match="class_x"):
        load_teacher(str(path), ("class_0", "class_1", "class_x"))


def test_wrong_class_count_names_the_shapes(tmp_path):
    path = tmp_path / "five.pth"
    torch.save(_state(num_classes=5), path)
    with pytest.raises(ModelSpecError) as e:
        load_teacher(f"test_resnet={path}", CLASSES)
    msg = str(e.value)
    assert "fc.weight" in msg and "(5, " in msg and "(3, " in msg and "3 classes" in msg


def test_missing_key_is_named(tmp_path, resnet_state):
    state = dict(resnet_state)
    del state["fc.bias"]
    path = tmp_path / "cut.pth"
    torch.save(state, path)
    with pytest.raises(ModelSpecError, match=r"missing keys \['fc.bias'\]"):
        load_teacher(f"test_resnet={path}", CLASSES)


def test_other_architectures_weights_are_refused(tmp_path):
    path = tmp_path / "conv.pth"
    torch.save(_state("test_convnext"), path)
    with pytest.raises(ModelSpecError, match="does not fit the architecture|has shape"):
        load_teacher(f"test_resnet={path}", CLASSES)


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
    with pytest.raises(ModelSpecError, match="weight must be positive"):
        load_teacher(f"test_resnet={path}*0", CLASSES)


def test_teachers_option_is_repeatable_and_comma_separated():
    assert split_specs(("a=x.pth@32,b*2", " c ", "d@380*0.5,")) == ["a=x.pth@32", "b*2", "c", "d@380*0.5"]
