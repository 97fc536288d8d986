"""--teacher-classes N=FILE: one teacher's class names, for any kind of teacher, and the command
line the teacher check prints with its fixes (the end-to-end run is in test_external_teachers)."""
from __future__ import annotations

import timm
import torch
import pytest

from mealv2.common.models.checkpoints import ModelSpecError, save_checkpoint
from mealv2.common.models.teacher_check import corrected_command
from mealv2.common.models.teachers import load_teachers, read_teacher_classes

CLASSES = ["class_0", "class_1", "class_2"]
OWN = ["class_2", "class_0", "class_1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    work = tmp_path_factory.mktemp("teacher_classes")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    torch.save(model.state_dict(), work / "sd.pth")
    save_checkpoint(work / "ckpt.pt", model=model, arch="test_resnet", classes=CLASSES, res=32,
                    mean=(0.5,) * 3, std=(0.5,) * 3)
    (work / "own.txt").write_text("\n".join(OWN) + "\n")
    (work / "two.txt").write_text("class_0\nclass_1\n")
    return work


def _mapped(t, x):
    with torch.no_grad():
        return t.model(x), t.logits(x)


def test_each_teacher_gets_its_own_names_over_classes_and_the_checkpoints_record(files):
    specs = [f"test_resnet={files / 'sd.pth'}@32", str(files / "ckpt.pt"), f"test_resnet={files / 'sd.pth'}@32"]
    stated = read_teacher_classes({2: str(files / "own.txt"), 3: str(files / "own.txt")}, len(specs))
    teachers, classes, _ = load_teachers(specs, CLASSES, 32, state_dict_classes=CLASSES, stated_classes=stated)
    assert classes == CLASSES
    assert [t.output_classes for t in teachers] == [CLASSES, OWN, OWN]
    x = torch.randn(2, 3, 32, 32)
    for t in teachers[1:]:
        raw, mapped = _mapped(t, x)
        for j, name in enumerate(CLASSES):
            torch.testing.assert_close(mapped[:, j], raw[:, OWN.index(name)])


def test_a_timm_teachers_names_are_overridden(monkeypatch):
    import mealv2.common.models.teachers as teachers

    names = list(timm.data.ImageNetInfo().label_names())
    names[:3] = OWN          # a fine-tuned head whose first outputs are the dataset's, in its own order
    monkeypatch.setattr(teachers, "create_timm_model",
                        lambda arch, n, **k: timm.create_model("test_resnet", num_classes=n))
    loaded, classes, _ = load_teachers(["resnet18"], CLASSES, stated_classes={1: names})
    assert loaded[0].output_classes == names and classes == names
    with pytest.raises(ModelSpecError, match=r"teacher 'resnet18' has 1000 outputs, its --teacher-classes file "
                                             r"names 3 classes"):
        load_teachers(["resnet18"], CLASSES, stated_classes={1: CLASSES})


def test_counts_and_numbers_are_checked(files, in_process):
    with pytest.raises(ModelSpecError, match=r"has 3 outputs, its --teacher-classes file names 2 classes"):
        load_teachers([str(files / "ckpt.pt")], CLASSES, stated_classes=read_teacher_classes(
            {1: str(files / "two.txt")}, 1))
    with pytest.raises(ModelSpecError, match=r"--teacher-classes 3=.*there are 2 teacher\(s\)"):
        read_teacher_classes({3: str(files / "own.txt")}, 2)
    r = in_process("label", files, "-t", str(files / "ckpt.pt"), "-o", files / "s", "--teacher-classes",
                   f"one={files / 'own.txt'}")
    assert r.returncode == 2 and "expected N=FILE" in r.stderr, r.stderr
    r = in_process("train", files, "--labels", files, "-a", "test_resnet", "-o", files / "r", "--teacher-classes",
                   f"1={files / 'own.txt'}")
    assert r.returncode == 2 and f"--teacher-classes 1={files / 'own.txt'} applies to online mode" in r.stderr, r.stderr


def test_the_corrected_command_changes_only_the_teachers_it_fixes():
    argv = ["label", "data dir", "-t", "a=x.pth,b=y.pth@64", "--teachers=c", "--classes", "k.txt",
            "--teacher-classes", "3=old.txt", "--teacher-classes=1=keep.txt", "-o", "s"]
    line = corrected_command(argv, {2: "b=y.pth@64%none"}, {3: "out/teacher3-classes.suggested.txt"})
    assert line == ("mealv2 label 'data dir' -t a=x.pth,b=y.pth@64%none --teachers=c --classes k.txt "
                    "--teacher-classes=1=keep.txt -o s --teacher-classes 3=out/teacher3-classes.suggested.txt")
