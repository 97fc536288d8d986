"""README's Python API loop with DDP, one process per GPU (or gloo ranks on a CPU):

    torchrun --nproc_per_node 8 examples/ddp_train.py /data/imagenet/train labels.zarr resnet50 --out student.pt

Each rank's ReplayLoader takes its share of every step (rank and world from torch.distributed);
``--batch-size`` is the global batch in crops, as ``mealv2 train --batch-size``. With the same
flags it trains what ``mealv2 train DATA --labels STORE -a ARCH --use-discriminator-loss
--w-cutmix`` trains on the same ranks (tests/test_api.py checks it with 2 gloo ranks). Rerun the
same command to resume from ``--out``.
"""
import argparse
import os

import timm
import timm.optim
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import mealv2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("store")
    p.add_argument("arch")
    p.add_argument("--out", default="student.pt")
    p.add_argument("--epochs", type=int, default=180)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args()

    # A GPU run's group serves CPU tensors too (the loader's checks gather Python objects).
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    torch.manual_seed(0)
    model = timm.create_model(args.arch, num_classes=len(mealv2.store_classes(args.store)))
    loader = mealv2.ReplayLoader(args.store, args.data, batch_size=args.batch_size, model=model, workers=args.workers)
    model.to(loader.device).train()
    ddp = DistributedDataParallel(model, device_ids=[loader.device.index] if loader.device.type == "cuda" else None)
    criterion = mealv2.MealV2Loss(loader.num_classes, temperature=loader.temperature, topk=loader.topk,
                                  discriminator=True).to(loader.device)
    optimizer = timm.optim.create_optimizer_v2(model, opt="momentum", lr=args.lr, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100, gamma=0.1)
    parts = {"model": model, "criterion": criterion, "optimizer": optimizer, "scheduler": scheduler, "loader": loader}
    if os.path.exists(args.out):
        saved = torch.load(args.out, map_location=loader.device, weights_only=True)
        for name, part in parts.items():
            part.load_state_dict(saved[name])
    for epoch in range(loader.epoch, args.epochs):
        for images, targets in loader:
            images, targets = loader.mix(images, targets, cutmix_alpha=1.0)
            loss = criterion(ddp(images), targets)
            optimizer.zero_grad()
            loss.backward()                  # DDP averages the student's gradients over the ranks
            optimizer.step()
            criterion.step()                 # ... and this the discriminator's, then steps it
        scheduler.step()
        if dist.get_rank() == 0:             # every rank holds the same weights and loader state
            torch.save({name: part.state_dict() for name, part in parts.items()}, args.out)
            print(f"epoch {epoch}: loss {criterion.kd_loss:.6f} (rank 0's last step)", flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
