"""`mealv2 eval`: MEAL V2's test protocol on mealv2 checkpoints, MEAL V2-style state dicts and
timm pretrained names; the numbers are checked against an independent evaluation loop."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image, ImageOps
from safetensors.torch import save_file
from torchvision import transforms as T

from conftest import make_image_dataset
from mealv2.common.data.dataset import build_index
from mealv2.common.errors import MealV2Error
from mealv2.common.models.checkpoints import save_checkpoint
from mealv2.stage2_train import evaluate as ev

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
ARCH = "test_resnet"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _images(data, res, mean, std):
    """(images, labels) decoded by hand: PIL + EXIF transpose, Resize(res/0.875), CenterCrop(res)."""
    index = build_index(data)
    tf = T.Compose([T.Resize(int(res / 0.875)), T.CenterCrop(res), T.ToTensor(), T.Normalize(mean, std)])
    xs = []
    for i in range(len(index)):
        with Image.open(index.path(i)) as im:
            xs.append(tf(ImageOps.exif_transpose(im).convert("RGB")))
    return torch.stack(xs), torch.tensor(index.labels)


def _model(num_classes: int, seed: int = 0, data=None, norm=IMAGENET) -> torch.nn.Module:
    """A random tiny model; with ``data``, its head is a random projection of the standardised
    features of those images, so predictions vary from image to image (a fresh random network's
    logits hardly depend on the input)."""
    torch.manual_seed(seed)
    model = timm.create_model(ARCH, num_classes=num_classes).eval()
    if data is not None:
        with torch.no_grad():
            feats = model.forward_head(model.forward_features(_images(data, 32, *norm)[0]), pre_logits=True)
            mu, sd = feats.mean(0), feats.std(0) + 1e-3
            w = torch.randn(num_classes, feats.shape[1]) / sd
            model.fc.weight.copy_(w)
            model.fc.bias.copy_(-w @ mu)
    return model


def _independent_eval(model, data, res, mean, std) -> dict:
    """Top-1/top-5 written out by hand, one image at a time."""
    images, labels = _images(data, res, mean, std)
    k = min(5, int(labels.max()) + 1)
    top1 = top5 = 0
    preds = []
    with torch.no_grad():
        for x, label in zip(images, labels.tolist()):
            ranked = model(x[None])[0].topk(k).indices.tolist()
            preds.append(ranked[0])
            top1 += ranked[0] == label
            top5 += label in ranked
    n = len(labels)
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "num_images": n, "preds": preds}


@pytest.fixture(scope="module")
def six_class_data(tmp_path_factory):
    """6 classes, so top-5 is not trivially 100%."""
    return make_image_dataset(tmp_path_factory.mktemp("six"), num_classes=6, per_class=3, seed=1)


def _invoke(*args):
    return CliRunner().invoke(ev.evaluate, [str(a) for a in args], catch_exceptions=True)


def test_eval_json_mealv2_checkpoint_matches_independent_loop(six_class_data, tmp_path, in_process):
    classes = [f"class_{c}" for c in range(6)]
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
    model = _model(6, data=six_class_data, norm=(mean, std))
    ckpt = tmp_path / "best.pt"
    save_checkpoint(ckpt, model=model, arch=ARCH, classes=classes, res=32, mean=mean, std=std, epoch=3)

    r = in_process("eval", six_class_data, "--checkpoint", ckpt, "--json", "--workers", "1", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    want = _independent_eval(model, six_class_data, 32, mean, std)
    assert len(set(want["preds"])) > 1, "test model predicts one class for everything"
    assert got["num_images"] == want["num_images"] == 18
    assert got["top1"] == pytest.approx(want["top1"])
    assert got["top5"] == pytest.approx(want["top5"])
    assert want["top5"] < 100          # top-5 really is measured
    assert got["arch"] == ARCH and got["res"] == 32 and got["checkpoint"] == str(ckpt)
    assert got["mean"] == pytest.approx(list(mean)) and got["std"] == pytest.approx(list(std))

    # --res overrides the checkpoint's resolution (MEAL V2's --res 224|380), -a may agree
    res = _invoke(six_class_data, "-a", ARCH, "--checkpoint", ckpt, "--res", 40, "--workers", 1, "--json")
    assert res.exit_code == 0, res.output
    got40 = json.loads(res.output)
    want40 = _independent_eval(model, six_class_data, 40, mean, std)
    assert got40["res"] == 40
    assert (got40["top1"], got40["top5"]) == pytest.approx((want40["top1"], want40["top5"]))

    # plain text output
    res = _invoke(six_class_data, "--checkpoint", ckpt, "--workers", 1)
    assert res.exit_code == 0, res.output
    assert f"top-1 {want['top1']:.2f}%" in res.output and f"top-5 {want['top5']:.2f}%" in res.output


def test_eval_of_a_safetensors_export_runs_it_as_its_checkpoint(six_class_data, tmp_path, in_process):
    """`mealv2 export --format safetensors` records the arch, classes, res and mean/std: eval used ImageNet's
    mean/std beside weights trained with others, and asked for -a."""
    classes = [f"class_{c}" for c in range(6)]
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
    model = _model(6, data=six_class_data, norm=(mean, std))
    ckpt = tmp_path / "best.pt"
    save_checkpoint(ckpt, model=model, arch=ARCH, classes=classes, res=32, mean=mean, std=std, epoch=3)
    assert in_process("export", ckpt, "--format", "safetensors").returncode == 0
    scored = [json.loads(in_process("eval", six_class_data, "--checkpoint", f, "--json", "--workers", "1",
                                    "--device", "cpu").stdout) for f in (ckpt, tmp_path / "best.safetensors")]
    for key in ("top1", "top5", "res", "mean", "std", "arch"):
        assert scored[0][key] == scored[1][key], key
    assert scored[1]["model"] == "mealv2-export"
    names = tmp_path / "names.txt"
    names.write_text("\n".join(reversed(classes)) + "\n")
    for f in (ckpt, tmp_path / "best.safetensors"):   # --classes is a state dict's: refused, not ignored
        res = _invoke(six_class_data, "--checkpoint", f, "--classes", names, "--workers", 1)
        assert isinstance(res.exception, ev.EvalError) and "leave --classes out" in str(res.exception)


def test_eval_meal_v2_release_style_state_dict(six_class_data, tmp_path):
    """MEAL V2 releases: DataParallel 'module.' keys under 'state_dict', -a ARCH, ImageNet mean/std."""
    model = _model(6, seed=1, data=six_class_data)
    released = tmp_path / "MEALV2_test_resnet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 180},
               released)
    res = _invoke(six_class_data, "-a", ARCH, "--checkpoint", released, "--res", 32, "--workers", 1, "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    want = _independent_eval(model, six_class_data, 32, *IMAGENET)
    assert len(set(want["preds"])) > 1
    assert (got["top1"], got["top5"], got["num_images"]) == pytest.approx(
        (want["top1"], want["top5"], want["num_images"]))
    assert got["mean"] == pytest.approx(list(IMAGENET[0])) and got["model"] == "state-dict"

    # a bare state dict with 'module.' keys works too; -a is required for it
    bare = tmp_path / "bare.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, bare)
    res = _invoke(six_class_data, "-a", ARCH, "--checkpoint", bare, "--res", 32, "--workers", 1, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["top1"] == pytest.approx(want["top1"])
    res = _invoke(six_class_data, "--checkpoint", bare)
    assert isinstance(res.exception, ev.EvalError) and "-a ARCH" in str(res.exception)

    # the teachers' rule for state dicts: no resolution is recorded, so --res is required ...
    res = _invoke(six_class_data, "-a", ARCH, "--checkpoint", bare, "--workers", 1)
    assert isinstance(res.exception, ev.EvalError) and "pass --res" in str(res.exception)
    # ... and --norm states another normalisation with a spec's %NORM names
    res = _invoke(six_class_data, "-a", ARCH, "--checkpoint", bare, "--res", 32, "--norm", "0.5", "--json")
    got = json.loads(res.output)
    assert got["mean"] == [0.5] * 3 and got["std"] == [0.5] * 3
    assert got["top1"] == pytest.approx(_independent_eval(model, six_class_data, 32, (0.5,) * 3, (0.5,) * 3)["top1"])


def test_eval_reads_a_safetensors_state_dict_under_any_suffix(six_class_data, tmp_path, in_process):
    """Once refused as "not a PyTorch checkpoint ... Unsupported operand 24", without a word of safetensors."""
    model = _model(6, seed=1, data=six_class_data)
    weights = tmp_path / "weights.pt"
    save_file(model.state_dict(), weights)
    res = _invoke(six_class_data, "-a", ARCH, "--checkpoint", weights, "--res", 32, "--workers", 1, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["top1"] == pytest.approx(_independent_eval(model, six_class_data, 32, *IMAGENET)["top1"])
    weights.write_bytes(weights.read_bytes()[:1000])
    r = in_process("eval", six_class_data, "-a", ARCH, "--checkpoint", weights, "--res", 32)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"mealv2: error: {weights}: cannot read checkpoint (a safetensors file, damaged" in r.stderr, r.stderr


def test_eval_class_count_mismatch_names_both(tiny_data, tmp_path):
    ckpt = tmp_path / "five.pt"
    save_checkpoint(ckpt, model=_model(5), arch=ARCH, classes=[f"c{i}" for i in range(5)], res=32,
                    mean=IMAGENET[0], std=IMAGENET[1])
    res = _invoke(tiny_data, "--checkpoint", ckpt, "--json")
    assert isinstance(res.exception, MealV2Error)   # `mealv2` prints it as 'mealv2: error: ...', exit 2
    assert "5 classes" in str(res.exception) and "'class_0'" in str(res.exception)
    assert res.output == ""

    # same for a MEAL V2-style state dict (1000-class head on a 3-class DATA)
    sd = tmp_path / "imagenet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in _model(1000).state_dict().items()}}, sd)
    res = _invoke(tiny_data, "-a", ARCH, "--checkpoint", sd)
    assert isinstance(res.exception, ev.EvalError)
    assert "1000 classes" in str(res.exception) and "3 classes" in str(res.exception)


def test_eval_maps_a_checkpoints_classes_by_name(six_class_data, tmp_path):
    """A mealv2 checkpoint of the same classes in another order is scored by name, as a teacher is."""
    model = _model(6, data=six_class_data)
    classes = [str(c) for c in build_index(six_class_data).classes]
    shuffled = [classes[i] for i in (3, 0, 5, 1, 4, 2)]
    # the same network with its output rows permuted to the shuffled order
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key in ("fc.weight", "fc.bias"):
        state[key] = state[key][[classes.index(c) for c in shuffled]]
    permuted = _model(6)
    permuted.load_state_dict(state)
    for name, m, order in (("ordered.pt", model, classes), ("shuffled.pt", permuted, shuffled)):
        save_checkpoint(tmp_path / name, model=m, arch=ARCH, classes=order, res=32, mean=IMAGENET[0],
                        std=IMAGENET[1])
    got = [json.loads(_invoke(six_class_data, "--checkpoint", tmp_path / n, "--json").output)["top1"]
           for n in ("ordered.pt", "shuffled.pt")]
    assert got[0] == got[1] == pytest.approx(_independent_eval(model, six_class_data, 32, *IMAGENET)["top1"])


def test_eval_scores_a_set_of_fewer_classes_among_its_own(six_class_data, tmp_path):
    """A student of the teachers' label space (more classes than the val set, e.g. ImageNet teachers on a
    10-class folder) is scored on the val set's classes only, found by name."""
    model = _model(6, data=six_class_data)
    names = [f"class_{c}" for c in range(6)]
    val = tmp_path / "val"
    for c in (4, 1, 3):   # a 3-class set whose sorted order is class_1, class_3, class_4
        shutil.copytree(six_class_data / f"class_{c}", val / f"class_{c}")
    save_checkpoint(tmp_path / "six.pt", model=model, arch=ARCH, classes=names, res=32, mean=IMAGENET[0],
                    std=IMAGENET[1])
    got = json.loads(_invoke(val, "--checkpoint", tmp_path / "six.pt", "--json").output)
    restricted = _model(3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key in ("fc.weight", "fc.bias"):
        state[key] = state[key][[1, 3, 4]]
    restricted.load_state_dict(state)
    expected = _independent_eval(restricted, val, 32, *IMAGENET)
    assert (got["top1"], got["top5"]) == pytest.approx((expected["top1"], expected["top5"]))


def test_eval_refuses_disagreeing_arch_and_class_names(tiny_data, tmp_path):
    ckpt = tmp_path / "ck.pt"
    save_checkpoint(ckpt, model=_model(3), arch=ARCH, classes=["a", "b", "c"], res=32,
                    mean=IMAGENET[0], std=IMAGENET[1])
    res = _invoke(tiny_data, "-a", "test_efficientnet", "--checkpoint", ckpt)
    assert isinstance(res.exception, ev.EvalError)
    assert ARCH in str(res.exception) and "test_efficientnet" in str(res.exception)
    res = _invoke(tiny_data, "--checkpoint", ckpt)
    assert isinstance(res.exception, MealV2Error)
    assert "'a'" in str(res.exception) and "class_0" in str(res.exception)
    res = _invoke(tiny_data, "-a", ARCH)
    assert isinstance(res.exception, ev.EvalError) and "--pretrained" in str(res.exception)


def test_eval_timm_pretrained_path(tiny_data, monkeypatch):
    """-a ARCH --pretrained asks timm for its pretrained weights and uses timm's mean/std.
    No network here: the weight download is replaced by a seeded model."""
    from mealv2.common.models import checkpoints as M

    cfg = timm.models.get_pretrained_cfg(ARCH)
    monkeypatch.setattr(M, "pretrained_cfg", lambda arch: dataclasses.replace(cfg, num_classes=3))
    asked = []

    def fake_create(arch, num_classes, pretrained=False, where=""):
        asked.append(pretrained)
        return _model(num_classes, data=tiny_data, norm=(cfg.mean, cfg.std))
    monkeypatch.setattr(M, "create_timm_model", fake_create)
    res = _invoke(tiny_data, "-a", ARCH, "--pretrained", "--res", 32, "--workers", 1, "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert asked == [True]
    assert got["mean"] == pytest.approx(list(cfg.mean)) and got["std"] == pytest.approx(list(cfg.std))
    want = _independent_eval(_model(3, data=tiny_data, norm=(cfg.mean, cfg.std)), tiny_data, 32, cfg.mean, cfg.std)
    assert (got["top1"], got["top5"], got["num_images"]) == pytest.approx(
        (want["top1"], want["top5"], want["num_images"]))

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(M, "create_timm_model", offline)
    res = _invoke(tiny_data, "-a", ARCH, "--pretrained")
    assert isinstance(res.exception, ev.EvalError)
    assert "pretrained weights" in str(res.exception) and "--checkpoint" in str(res.exception)


def test_a_trainers_later_validations_read_the_decoded_images_and_score_the_same(six_class_data, monkeypatch):
    from mealv2.common.models.runtime import Runtime
    from mealv2.stage2_train import validate as val

    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
    model = _model(6, data=six_class_data, norm=(mean, std))
    index, runtime = build_index(six_class_data), Runtime(torch.device("cpu"))
    want = _independent_eval(model, six_class_data, 32, mean, std)

    decoded = val.DecodedVal()
    first = val.validate(model, index, 32, mean, std, runtime, batch_size=4, workers=0, decoded=decoded)
    assert decoded.batches is not None and sum(len(labels) for _, labels in decoded.batches) == 18
    monkeypatch.setattr(val, "decode_rgb", lambda path: pytest.fail(f"{path} decoded again"))
    again = val.validate(model, index, 32, mean, std, runtime, batch_size=4, workers=0, decoded=decoded)
    assert first == again
    assert (first["top1"], first["top5"]) == pytest.approx((want["top1"], want["top5"]))

    # a share too big for the cache is streamed every time
    monkeypatch.undo()
    monkeypatch.setattr(val, "CACHE_BYTES", 18 * 3 * 32 * 32 - 1)
    streamed = val.DecodedVal()
    assert val.validate(model, index, 32, mean, std, runtime, batch_size=4, workers=0, decoded=streamed) == first
    assert streamed.batches is None


def test_normalise_is_torchvisions_to_tensor_and_normalize():
    from mealv2.stage2_train.validate import normalise

    pixels = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
    want = torch.stack([T.Normalize(mean, std)(T.ToTensor()(T.ToPILImage()(p))) for p in pixels])
    assert torch.equal(normalise(pixels, mean, std), want)
