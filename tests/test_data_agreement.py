"""The data every rank trains on is one list of files, each listed once: ranks compare what they
indexed, and a CSV that lists a file twice is refused, naming its lines."""
from __future__ import annotations

import shutil

import pytest

from mealv2.common.data.dataset import DatasetError, build_index, build_index_shared


class _Rank:
    """A rank of a 2-rank job whose other rank indexed ``other`` (fingerprint, images)."""

    def __init__(self, rank: int, rank0_fingerprint: str, other: tuple[str, int]):
        self.rank, self.world_size, self.enabled = rank, 2, True
        self.rank0_fingerprint, self.other = rank0_fingerprint, other

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast_object(self, obj):
        return obj if self.is_main else (self.rank0_fingerprint, None)

    def gather_object(self, obj):
        return [obj, self.other] if self.is_main else [self.other, obj]


def test_ranks_that_indexed_different_files_all_refuse_with_one_message(tiny_data, tmp_path, monkeypatch):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    monkeypatch.setenv("MEALV2_CACHE", str(tmp_path / "node0"))
    full = build_index(data, cache=True)
    (data / "class_2" / "img_03.jpg").unlink()          # what rank 1's node sees under the same path
    monkeypatch.setenv("MEALV2_CACHE", str(tmp_path / "node1"))   # node-local cache: rank 0's file is not there
    partial = build_index(data)
    messages = []
    for rank, other in ((1, (full.fingerprint, len(full))), (0, (partial.fingerprint, len(partial)))):
        if rank == 0:
            monkeypatch.setattr("mealv2.common.data.dataset.build_index", lambda *a, **k: full)
        with pytest.raises(DatasetError, match="differs between ranks") as e:
            build_index_shared(data, _Rank(rank, full.fingerprint, other))
        messages.append(str(e.value))
    assert messages[0] == messages[1]
    assert f"rank 0 has {len(full)} images" in messages[0] and f"rank 1: {len(partial)} images" in messages[0]


def test_a_csv_that_lists_a_file_twice_is_refused_naming_the_lines(tiny_data, tmp_path, in_process):
    csv = shutil.copytree(tiny_data, tmp_path / "data") / "twice.csv"
    csv.write_text("path,label\nclass_0/img_03.jpg,class_0\nclass_1/img_03.jpg,class_1\n"
                   "class_0/img_03.jpg,class_1\n./class_1/img_03.jpg,class_1\n")
    with pytest.raises(DatasetError) as e:
        build_index(csv)
    assert "lists 2 file(s) on more than one row" in str(e.value)
    assert "class_0/img_03.jpg: lines 2, 4 (labels class_0, class_1)" in str(e.value)
    assert "class_1/img_03.jpg: lines 3, 5 (labels class_1, class_1)" in str(e.value)
    r = in_process("train", csv, "--hard-labels", "-a", "test_resnet", "-o", tmp_path / "run", "--dry-run",
                   "--device", "cpu")
    assert r.returncode == 2 and "lines 2, 4" in r.stderr and str(csv) in r.stderr, r.stderr
