"""The `mealv2` command: label once, train many students.

Subcommands are imported when invoked, so `mealv2 --help` does not pay for torch and DALI.
"""
from __future__ import annotations

import importlib
import sys

import click

from .. import __version__
from ..common.errors import MealV2Error

COMMANDS = {  # name: (module, attribute, one-line help)
    "label": ("mealv2.stage1_label.commands", "label", "Stage 1: store the teacher ensemble's soft labels."),
    "train": ("mealv2.stage2_train.commands", "train", "Stage 2: train a timm student from a label store."),
    "eval": ("mealv2.stage2_train.evaluate", "evaluate", "Top-1/top-5 with MEAL V2's test protocol."),
    "export": ("mealv2.stage2_train.export", "export", "Export a checkpoint to ONNX, TorchScript or safetensors."),
    "inspect": ("mealv2.stage1_label.store_commands", "inspect", "Show what a label store holds."),
    "verify": ("mealv2.stage1_label.store_commands", "verify", "Check a label store's checksums and completeness."),
    "cache": ("mealv2.stage1_label.store_commands", "cache", "List or free the local cache of stores read from URLs."),
    "publish": ("mealv2.stage1_label.store_commands", "publish",
                "Copy a finished label store to share, without its local checkpoint paths."),
    "demo": ("mealv2.demo", "demo", "Whole pipeline on a generated dataset, in minutes on a CPU."),
    "bench": ("mealv2.cli", "bench", "Throughput and size benchmarks of both stages."),
}
BENCHMARKS = {
    "label": ("mealv2.benchmarks.label", "bench_label", "Stage-1 crops/s against bare teacher forward; bytes/crop against FKD."),
    "train": ("mealv2.benchmarks.train", "bench_train", "Student img/s with stored labels, hard labels and online teachers."),
    "loader": ("mealv2.benchmarks.loader", "bench_loader",
               "Crops/s of each crop loader (no model) against a bare decode-and-resize loop."),
    "startup": ("mealv2.benchmarks.startup", "bench_startup", "Seconds from `train` start to its first step at ImageNet size."),
    "gpu": ("mealv2.benchmarks.gpu", "bench_gpu", "GPU smoke run: label, train bf16 + compile (+ torchrun), eval, export."),
    "precision": ("mealv2.benchmarks.precision", "bench_precision",
                  "KL of teachers' bf16/fp16 softmax from fp32, beside the store encoding's."),
    "layers": ("mealv2.benchmarks.layers", "bench_layers",
               "KL of per-teacher top-k layers recombined from the exact ensemble, beside the stored top-k's."),
    "demo": ("mealv2.benchmarks.demo", "bench_demo", "`mealv2 demo` over seeds: mean and spread of each gap."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are named in a table and imported on first use."""

    def __init__(self, *args, table: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.table = table

    def list_commands(self, ctx):
        return list(self.table)

    def get_command(self, ctx, name):
        if name not in self.table:
            return None
        module, attr, _ = self.table[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, _, text) in self.table.items()])


@click.group(cls=LazyGroup, table=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mealv2")
def cli():
    """MEAL V2 distillation in two stages: `label` stores the teacher ensemble's soft labels
    for many random crops once; `train` replays them to train any timm student."""


@click.group(cls=LazyGroup, table=BENCHMARKS)
def bench():
    """Benchmarks that measure the targets side by side in one run; figures go to BENCHMARKS.md."""


# Flags of MEAL V2's and FKD's train.py that users copy from their READMEs: what mealv2 calls them (click's own
# guess by spelling sent --num_crops to --cos).
TORCHRUN = "many GPUs are torchrun's: `torchrun --nproc_per_node N -m mealv2.cli train ...` (README)"
FOREIGN_FLAGS = {
    "--num_crops": "--crops-per-image (FKD's num_crops)",
    "--softlabel_path": "--labels STORE, a label store `mealv2 label` wrote (FKD's soft labels)",
    "--mode": "FKD's --mode fkd_save is `mealv2 label DATA -t TEACHERS -o STORE`, and training from the "
              "store `mealv2 train DATA --labels STORE`",
    "--temp": "--temperature",
    "-j": "--workers",
    "-b": "--batch-size (crops per step, over all ranks)",
    "--teacher-model": "-t/--teachers (comma separated, as MEAL V2's)",
    "--student-model": "-a/--arch",
    "--s-arch": "-a/--arch",
    "--save": "-o/--out",
    "--save_checkpoint_path": "-o/--out",
    "--warm-up": "--warmup-epochs N",
    "--multiprocessing-distributed": TORCHRUN,
    "--dist-url": TORCHRUN,
    "--world-size": TORCHRUN,
    "--rank": TORCHRUN,
}


def foreign_flag_hint(e: click.NoSuchOption) -> None:
    """Say what mealv2 calls a flag of MEAL V2's or FKD's scripts, in place of click's guess by spelling."""
    if hint := FOREIGN_FLAGS.get(e.option_name):
        e.message = f"No such option: {e.option_name}. In mealv2: {hint}"
        e.possibilities = None


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.NoSuchOption as e:
        foreign_flag_hint(e)
        e.show()
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except MealV2Error as e:
        click.echo(f"mealv2: error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        click.echo(f"mealv2: error: {e.strerror or e}{where}", err=True)
        sys.exit(2)

