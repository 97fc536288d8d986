"""Validation under DDP scores the model a checkpoint keeps (rank 0's), not a mix of the ranks'
BatchNorm statistics: each rank's running stats move on its own last training batch."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mealv2.demo import SHIPPED_TEACHERS
from mealv2.synthetic import SyntheticConfig, generate


def _rank(rank: int, world: int, port: int, val: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), MEALV2_CHECK_COLLECTIVES="cuda")
    torch.set_num_threads(1)
    from mealv2.common.data.dataset import build_index
    from mealv2.common.models.distributed import DistInfo, distributed
    from mealv2.common.models.checkpoints import load_checkpoint_file, model_from_mealv2_checkpoint
    from mealv2.common.models.runtime import Runtime
    from mealv2.stage2_train.validate import validate

    ckpt = load_checkpoint_file(SHIPPED_TEACHERS / "test_resnet_s0.pt")   # a trained model: its predictions vary
    model = model_from_mealv2_checkpoint(ckpt, "demo teacher").float()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns, "the test needs a student with BatchNorm"
    if rank == 1:   # as if rank 1's last training batch had moved its running statistics
        for m in bns:
            m.running_mean += 0.5
            m.running_var *= 3.0
    index, runtime = build_index(val), Runtime(torch.device("cpu"))
    # workers=0: the scores do not depend on who decodes, and a loader worker of a spawned rank took ~5 s to start
    args = dict(index=index, res=ckpt["res"], mean=ckpt["mean"], std=ckpt["std"], runtime=runtime, batch_size=10,
                workers=0)
    rank0_model = None
    if rank == 0:
        rank0_model = {k: v.clone() for k, v in model.state_dict().items()}
    with distributed("cpu") as (info, _):
        sharded = validate(model, **args, info=info)
    result = {"sharded": sharded["top1"]}
    if rank == 0:
        model.load_state_dict(rank0_model)
        result["rank0_alone"] = validate(model, **args, info=DistInfo())["top1"]
        for m in bns:   # what a rank-1 model would score alone: the mismatch is visible at this size
            m.running_mean += 0.5
            m.running_var *= 3.0
        result["rank1_alone"] = validate(model, **args, info=DistInfo())["top1"]
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(result, f)


@pytest.mark.slow
def test_two_rank_validation_scores_rank_0s_model(tmp_path):
    val = generate(tmp_path / "data", SyntheticConfig(seed=3, train_per_class=1, val_per_class=5))["val"]  # 50
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "result")
    mp.spawn(_rank, args=(2, port, str(val), out), nprocs=2)
    r0, r1 = (json.loads(open(f"{out}.{rank}.json").read()) for rank in (0, 1))
    assert r0["rank1_alone"] != r0["rank0_alone"], "the two ranks' models must score differently for the test to tell"
    assert r0["sharded"] == r1["sharded"] == r0["rank0_alone"]
