"""`mealv2 bench loader`'s measure on a few small JPEGs: every installed loader beside its bare loop."""
import pytest
import torch

from mealv2.benchmarks import loader as bench
from mealv2.benchmarks.common import make_photo_dataset
from mealv2.common.data.dataset import build_index


@pytest.mark.slow   # spawns the process pool it compares threads with
def test_bench_loader_measures_each_loader_beside_its_bare_loop(tmp_path):
    index = build_index(make_photo_dataset(tmp_path / "d", 2, 4, shape=(60, 80)))
    rows = bench.measure(index, torch.device("cpu"), threads=1, res=32, batch=4, repeats=1, crops_options=(2,))
    assert [(r["name"], r["crops"]) for r in rows] == [("dali", 2), ("torch", 2), ("torch, device path on the CPU", 2),
                                                     ("torch's bare loop on processes", 4)]
    assert all(r["bare"] > 0 for r in rows)
    assert all(r["uint8"] > 0 for r in rows if r["name"] != "torch, device path on the CPU")   # no uint8 stage
    assert all(r["loader"] > 0 and r["thread_us"] > 0 for r in rows[:3])
    lines = bench.table(rows, cores=1)
    assert len(lines) == 2 + len(rows) and all(line.count("|") == 10 for line in lines)
