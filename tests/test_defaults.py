"""`mealv2 train`'s defaults are the ones README's table attributes to MEAL V2 and FKD, and the
optimizer they build is MEAL V2's (plain SGD with momentum, not timm's Nesterov `sgd`)."""
from __future__ import annotations

import re
from pathlib import Path

from mealv2.common.config import Pair
from mealv2.common.models.checkpoints import load_checkpoint_file
from mealv2.stage2_train.commands import train
from mealv2.stage2_train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def readme_defaults() -> dict[str, str]:
    """{flag: default} of README's table of defaults."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("- Defaults are MEAL V2's", 1)[1].split("\n- ", 1)[0]
    return dict(re.findall(r"^\s*\| `(--[a-z-]+)` \| `([^`]+)` \|", section, re.M))


def _same(option_default, text: str) -> bool:
    if isinstance(option_default, str):
        return option_default == text
    if isinstance(option_default, tuple):
        return Pair().parse(text) == option_default
    return [float(v) for v in text.split(",")] == [float(option_default)]


def unset_means(flag: str):
    """What a crop flag left out means without --labels (with them, the store's)."""
    fresh = TrainConfig("d", "o", "a", hard_labels=True)
    return {"--crops-per-image": fresh.fresh_crops_per_image,
            **{f"--{k}": v for k, v in vars(fresh.fresh_crop).items()}}[flag]


def test_readme_table_of_defaults_is_the_commands():
    table = readme_defaults()
    assert {"--opt", "--momentum", "--wd", "--lr", "--lr-step", "--warmup-epochs", "--epochs", "--batch-size",
            "--temperature", "--cutmix-alpha", "--cutmix-prob", "--d-lr", "--scale",
            "--crops-per-image"} <= set(table)
    options = {opt: p for p in train.params for opt in getattr(p, "opts", ())}
    for flag, text in table.items():
        default = options[flag].default if options[flag].default is not None else unset_means(flag)
        assert _same(default, text), f"README says {flag} defaults to {text}, `mealv2 train` has {default!r}"


def test_default_optimizer_is_plain_sgd_with_momentum_and_no_weight_decay(tiny_data, tmp_path, in_process):
    run = tmp_path / "run"
    r = in_process("train", tiny_data, "--hard-labels", "-a", "test_resnet", "-o", run, "--epochs", 1, "--res", 32,
                   "--crops-per-image", 2, "--batch-size", 8, "--device", "cpu", "--workers", 2, "--loader", "torch")
    assert r.returncode == 0, r.stderr
    groups = load_checkpoint_file(run / "last.pt")["optimizer"]["param_groups"]
    assert all(g["nesterov"] is False and g["momentum"] == 0.9 and g["weight_decay"] == 0 for g in groups)
