"""`mealv2 export`: each format is re-loaded here with its own runtime (onnxruntime,
torch.jit.load, a fresh timm model from safetensors) and must reproduce PyTorch's logits."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from click.testing import CliRunner
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import load_file

from mealv2.common.models.checkpoints import save_checkpoint
from mealv2.stage2_train import export as ex
from mealv2.stage2_train.utils import RUN_LOCK

CLASSES = ["cat", "dog", "owl", "yak"]
MEAN, STD = (0.5, 0.45, 0.4), (0.2, 0.25, 0.3)
RES = 32


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _checkpoint(path, arch):
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=len(CLASSES)).eval()
    with torch.no_grad():   # non-trivial BN statistics, so eval-mode export errors would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    save_checkpoint(path, model=model, arch=arch, classes=CLASSES, res=RES, mean=MEAN, std=STD, epoch=1)
    return model


def _batch(n, res=RES, seed=1):
    return torch.randn(n, 3, res, res, generator=torch.Generator().manual_seed(seed))


def _export(*args):
    return CliRunner().invoke(ex.export, [str(a) for a in args], catch_exceptions=True)


def _reported_diff(output: str) -> float:
    line = next(l for l in output.splitlines() if l.startswith("max abs difference"))
    return float(line.split(": ")[1].split()[0])


def test_export_onnx_runs_in_onnxruntime_with_dynamic_batch(tmp_path, in_process):
    model = _checkpoint(tmp_path / "best.pt", "test_resnet")
    r = in_process("export", tmp_path / "best.pt", "--format", "onnx")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "best.onnx"
    assert f"wrote {out}" in r.stdout and _reported_diff(r.stdout) < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.onnx", "best.pt"]   # no temp leftovers

    onnx.checker.check_model(str(out))
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["arch"] == "test_resnet" and json.loads(meta["classes"]) == CLASSES
    assert int(meta["res"]) == RES and json.loads(meta["mean"]) == pytest.approx(list(MEAN))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.shape[1:] == [3, RES, RES] and not isinstance(inp.shape[0], int)   # dynamic batch
    for n in (1, 5):
        x = _batch(n, seed=n)
        (got,) = session.run(None, {inp.name: x.numpy()})
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == (n, len(CLASSES))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_export_torchscript_matches_pytorch(tmp_path):
    model = _checkpoint(tmp_path / "last.pt", "test_efficientnet")
    out = tmp_path / "sub" / "student.ts"
    res = _export(tmp_path / "last.pt", "--format", "torchscript", "--out", out)
    assert res.exit_code == 0, res.output
    assert f"wrote {out}" in res.output and _reported_diff(res.output) < 1e-4
    extra = {"mealv2.json": ""}
    scripted = torch.jit.load(str(out), _extra_files=extra)
    meta = json.loads(extra["mealv2.json"])
    assert meta["arch"] == "test_efficientnet" and json.loads(meta["classes"]) == CLASSES
    x = _batch(4)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), atol=1e-5, rtol=1e-5)


def test_export_safetensors_loads_into_fresh_timm_model(tmp_path):
    model = _checkpoint(tmp_path / "best.pt", "test_efficientnet")
    res = _export(tmp_path / "best.pt", "--format", "safetensors", "--res", 48)
    assert res.exit_code == 0, res.output
    out = tmp_path / "best.safetensors"
    assert f"wrote {out}" in res.output and _reported_diff(res.output) == 0
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "test_efficientnet" and json.loads(meta["classes"]) == CLASSES
    assert meta["res"] == "48" and json.loads(meta["mean"]) == pytest.approx(list(MEAN))
    assert json.loads(meta["std"]) == pytest.approx(list(STD))
    fresh = timm.create_model(meta["arch"], num_classes=len(json.loads(meta["classes"]))).eval()
    fresh.load_state_dict(load_file(str(out)), strict=True)
    x = _batch(3, res=48)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_export_plain_state_dict_with_arch(tmp_path):
    """MEAL V2-style release (module. keys under 'state_dict') needs -a; class count from its head."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=7).eval()
    sd = tmp_path / "release.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, sd)
    res = _export(sd, "--format", "safetensors")
    assert res.exit_code != 0 and "-a ARCH" in str(res.exception)
    res = _export(sd, "--format", "safetensors", "-a", "test_resnet", "--res", RES)
    assert res.exit_code == 0, res.output
    out = tmp_path / "release.safetensors"
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["num_classes"] == "7" and json.loads(meta["classes"]) is None
    fresh, meta2 = ex.load_safetensors_model(out)
    x = _batch(2)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    # its outputs are unnamed: eval takes --classes for them, one name per output
    names = [f"c{i}" for i in range(7)]
    assert ex.load_model(out, None, state_dict_classes=names).classes == names
    with pytest.raises(ex.EvalError, match="--classes names 6 classes, .* has 7 outputs"):
        ex.load_model(out, None, state_dict_classes=names[:6])


def test_export_fails_and_writes_nothing_when_outputs_differ(tmp_path, monkeypatch):
    _checkpoint(tmp_path / "best.pt", "test_resnet")
    run = ex.RUNNERS["torchscript"]
    monkeypatch.setitem(ex.RUNNERS, "torchscript", lambda path, x: run(path, x) + 0.05)
    res = _export(tmp_path / "best.pt", "--format", "torchscript")
    assert isinstance(res.exception, ex.ExportError)
    assert "differ from PyTorch's" in str(res.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


def test_export_refuses_disagreeing_arch(tmp_path):
    _checkpoint(tmp_path / "best.pt", "test_resnet")
    res = _export(tmp_path / "best.pt", "--format", "onnx", "-a", "test_efficientnet")
    assert isinstance(res.exception, ex.EvalError)
    assert "test_resnet" in str(res.exception) and "test_efficientnet" in str(res.exception)
    res = _export(tmp_path / "best.pt", "--format", "onnx", "--out", tmp_path / "best.pt")
    assert isinstance(res.exception, ex.ExportError) and "checkpoint itself" in str(res.exception)


def test_an_opset_torch_cannot_reach_is_refused_and_one_it_can_is_written(tmp_path):
    """torch.onnx falls back to its own opset when converting down fails: --opset 7 wrote opset 18 and exited 0."""
    _checkpoint(tmp_path / "best.pt", "test_resnet")
    res = _export(tmp_path / "best.pt", "--format", "onnx", "--opset", 7)
    assert isinstance(res.exception, ex.ExportError)
    assert "--opset 7: torch.onnx could not convert test_resnet to opset 7 and wrote opset" in str(res.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]
    res = _export(tmp_path / "best.pt", "--format", "onnx", "--opset", 20)
    assert res.exit_code == 0, res.output
    assert {e.domain or "ai.onnx": e.version for e in onnx.load(str(tmp_path / "best.onnx")).opset_import}[
        "ai.onnx"] == 20


def test_exporting_a_checkpoint_of_a_run_still_training_says_so(tmp_path, in_process):
    _checkpoint(tmp_path / "best.pt", "test_resnet")
    lock = FileLock(tmp_path / RUN_LOCK, timeout=0)
    lock.acquire()
    (tmp_path / RUN_LOCK).write_text("pid 4242 on host, since now\n")
    try:
        r = in_process("export", tmp_path / "best.pt", "--format", "safetensors")
    finally:
        lock.release()
    assert r.returncode == 0 and f"note: {tmp_path} is still training (pid 4242 on host" in r.stderr
    assert "still training" not in in_process("export", tmp_path / "best.pt", "--format", "safetensors").stderr
