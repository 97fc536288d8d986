"""What a store tells (issue 28): `verify --data` loads no teacher unless asked (--recompute), never
trusting checkpoints unasked; `mealv2 publish` writes a copy without its maker's checkpoint paths."""
from __future__ import annotations

import shutil

import zarr

from mealv2.common.models import checkpoints, teachers
from mealv2.common.store.schema import ATTR_KEY, DIGEST_KEY, json_digest

MISSING_CKPT = "/nonexistent/mealv2-maker/teacher.pth"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _with_teachers(store, specs: list[str]):
    """Give ``store``'s teachers other specs, as a store made elsewhere would name them (digest kept right)."""
    group = zarr.open_group(store, mode="r+")
    attrs = dict(group.attrs[ATTR_KEY])
    attrs["teachers"] = [{**t, "spec": spec} for t, spec in zip(attrs["teachers"] * len(specs), specs)]
    group.attrs.update({ATTR_KEY: attrs, DIGEST_KEY: json_digest(attrs)})
    return store


def _refuse_loading(monkeypatch):
    def load(spec, *args, **kwargs):
        raise AssertionError(f"teacher {spec} loaded")
    monkeypatch.setattr(teachers, "load_teacher", load)
    monkeypatch.setattr(teachers, "build_teacher", load)


# ---- verify --------------------------------------------------------------------------------------------

def test_verify_data_checks_the_images_without_loading_the_teachers_the_store_names(labelled, tmp_path, in_process,
                                                                                     monkeypatch):
    """A downloaded store names its maker's checkpoint paths and hub models: `verify --data` must not read
    or fetch them (issue 28); --recompute does, by the recorded specs."""
    store = _with_teachers(_copy(labelled.store, tmp_path / "store"),
                           [f"test_resnet={MISSING_CKPT}@32", "no_such_hub_model_xyz.in1k"])
    with monkeypatch.context() as m:
        _refuse_loading(m)
        checked = in_process("verify", store, "--data", labelled.data)
    assert checked.returncode == 0, checked.stderr
    assert "teachers not re-run" in checked.stdout and f"{store}: OK" in checked.stdout
    # the images are still checked against the store: another dataset is named
    other = _copy(labelled.data, tmp_path / "other")
    next(other.glob("*/*.jpg")).unlink()
    with monkeypatch.context() as m:
        _refuse_loading(m)
        refused = in_process("verify", store, "--data", other)
    assert refused.returncode == 1 and "dataset fingerprint" in refused.stderr, refused.stderr
    loaded = in_process("verify", store, "--data", labelled.data, "--recompute", 2, "--device", "cpu")
    assert loaded.returncode == 2 and f"checkpoint file {MISSING_CKPT} does not exist" in loaded.stderr, loaded.stderr


def test_recompute_needs_data(labelled, in_process):
    r = in_process("verify", labelled.store, "--recompute", 2)
    assert r.returncode == 2 and "--recompute 2 re-runs the teachers on stored crops of DATA; add --data" in r.stderr


def test_verify_recompute_trusts_checkpoints_only_when_told(labelled, in_process, monkeypatch):
    trusted = []
    read = teachers.load_checkpoint_file

    def recording(path):
        trusted.append(checkpoints._trusted.get())
        return read(path)

    monkeypatch.setattr(teachers, "load_checkpoint_file", recording)
    args = ("verify", labelled.store, "--data", labelled.data, "--recompute", 2, "--device", "cpu")
    assert in_process(*args).returncode == 0 and trusted == [False]
    assert in_process(*args, "--trust-checkpoint").returncode == 0 and trusted == [False, True]
