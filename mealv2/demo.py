"""`mealv2 demo`: what the product is for, measured on a generated dataset in minutes on a CPU.

1. generate an ImageFolder dataset (mealv2/synthetic.py: shapes and textures in clutter, half
   of the images with a smaller object of another class)
2. teachers: two small networks shipped in the package (mealv2/demo_teachers/), trained once,
   longer, at 64 px (4x the student's pixels and FLOPs) and on 4x more images of a disjoint
   seed, by ``mealv2 demo --build-teachers DIR`` (the commands are in DIR/teachers.json); or any
   mealv2 checkpoints given with --teachers
3. store their ensemble's soft labels for random crops, one round per pass the students take:
   `mealv2 label`, `mealv2 inspect` and its report of the store (`--report`: pictures of the labels and of
   the crops the teachers dispute most), which report.md links
4. student A three ways on the same budget (epochs, crops, batch, lr, schedule, seed): from the
   store (`train --labels`), distilled online from the same teachers (`train --teachers`, MEAL V2
   as published), and on the dataset's labels (`train --hard-labels`), all three on the same
   crops in the same order; student B, another architecture, from the same store and on hard
   labels (no teacher runs); student A from the store again with other seeds, whose spread is
   the noise of one run (cheap: no teacher runs)
5. evaluate every model with `mealv2 eval`; the ensemble with the same validate() on the mean
   of the teachers' softmax; judge each accuracy gap's target against that seed noise: one seed
   of a few hundred steps moves top-1 by points, so a gap within noise of its target is no miss

The demo is the Python API's first user: every stage calls the public function (``mealv2.label``,
``mealv2.train``) or the one behind a command (`mealv2 eval`, `mealv2 inspect`) and reads its result;
each is printed before it runs as the equivalent `mealv2` shell line (common/config.config_args),
which report.md lists for every row, and every number in the table, report.md and results.json
comes from those results (eval's, inspect's and the metrics rows train returns).
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import shlex
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from .cli.params import POSITIVE
from .common.config import Pair, config_args
from .common.data.crops import CropParams

SHIPPED_TEACHERS = Path(__file__).parent / "demo_teachers"
# (file name, arch, optimizer, lr, seed, res) of the shipped teachers: two ResNets of different
# initialisations and crop orders (an ensemble of diverse members) that see each crop at 64 px, 4x
# the student's pixels and 4x its forward FLOPs (MEAL V2's teachers cost 3-5x a ResNet-50), and the
# data they were trained on: a seed no demo run uses (demo seeds are < 1000), 4x the demo's images.
TEACHER_RECIPES = (("test_resnet_s0", "test_resnet", "sgd", 0.1, 0, 64),
                   ("test_resnet_s1", "test_resnet", "sgd", 0.1, 1, 64))
TEACHER_DATA = dict(seed=1000, train_per_class=400, val_per_class=50)
TEACHER_EPOCHS = 40
# Optimiser and lr per student architecture (SGD for ResNets, AdamW otherwise); every mode of one
# architecture gets the same. test_resnet's 0.2 and test_byobnet's 0.008 are the best lr of the
# hard-label baseline in a grid at the default size (BENCHMARKS.md, "mealv2 demo"): the baseline
# is tuned, the distilled students take its lr.
RECIPES = {"test_resnet": ("sgd", 0.2), "test_byobnet": ("adamw", 0.008), "resnet10t": ("sgd", 0.1)}
DEFAULT_RECIPE = ("adamw", 0.004)
TRAIN_ORDER = ("hard", "online", "stored")
RUN_DIRS = ("labels", "students")   # what a demo run (re)creates under --out
# A gap between two single runs is judged against 2 standard deviations of such a difference (the
# noise of one run, measured on student A's stored-label seeds, times sqrt 2).
NOISE_Z = 2.0
OUTPUTS = ("report.md", "curves.png", "results.json")


def rounds_for(epochs: int, num_images: int, batch_size: int, crops_per_image: int) -> int:
    """Label rounds that give every training step crops of their own: the passes over the images
    that ``epochs`` epochs of N crops take, rounded up. Round r's crops are the sampler's round r,
    which is also what an online or hard-label run of the same seed draws in pass r, so the three
    students of one architecture see the same crops in the same order: only the targets differ."""
    from .stage2_train.loader import steps_per_epoch, steps_per_pass

    steps = epochs * steps_per_epoch(num_images, batch_size)
    return -(-steps // steps_per_pass(num_images, batch_size // crops_per_image))


def curve_subset(val: Path, per_class: int) -> Path:
    """VAL/../val-curve.csv: the first ``per_class`` images of each class of VAL, the split the
    trainers score every epoch for curves.png (the table scores the whole of VAL once, at the end)."""
    path = val.parent / "val-curve.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for folder in sorted(p for p in val.iterdir() if p.is_dir()):
            for image in sorted(folder.iterdir())[:per_class]:
                writer.writerow([image.relative_to(path.parent).as_posix(), folder.name])
    return path


def recipe(arch: str) -> tuple[str, float]:
    return RECIPES.get(arch, DEFAULT_RECIPE)


def shipped_teachers() -> list[str]:
    return [str(SHIPPED_TEACHERS / f"{name}.pt") for name, *_ in TEACHER_RECIPES]


@dataclass
class Step:
    """One stage the demo ran, as its `mealv2` command line, with its wall and process-CPU seconds."""

    stage: str
    args: list[str]
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    @property
    def shell(self) -> str:
        return shlex.join(["mealv2", *self.args])


@dataclass
class Runner:
    """Calls a stage's function, printing the equivalent `mealv2 ARGS` first; keeps steps and stage times."""

    steps: list[Step] = field(default_factory=list)
    stages: dict[str, dict] = field(default_factory=dict)

    def __call__(self, stage: str, args: list, function, *fargs, **fkwargs) -> tuple[object, Step]:
        step = Step(stage, [str(a) for a in args])
        click.secho(f"\n$ {step.shell}", fg="cyan", bold=True)
        wall, cpu = time.perf_counter(), time.process_time()
        result = function(*fargs, **fkwargs)
        step.seconds, step.cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
        self.steps.append(step)
        self.add_time(stage, step.seconds, step.cpu_seconds)
        return result, step

    def label(self, stage: str, cfg) -> tuple[object, Step]:
        from . import label

        return self(stage, ["label", *config_args(cfg)], label, cfg)

    def train(self, stage: str, cfg) -> tuple[list[dict], Step]:
        from . import train

        return self(stage, ["train", *config_args(cfg)], train, cfg)

    @contextlib.contextmanager
    def timed(self, stage: str):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.add_time(stage, time.perf_counter() - wall, time.process_time() - cpu)

    def add_time(self, stage: str, wall: float, cpu: float) -> None:
        t = self.stages.setdefault(stage, {"wall_s": 0.0, "cpu_s": 0.0})
        t["wall_s"] += wall
        t["cpu_s"] += cpu


def read_metrics(path: Path) -> list[dict]:
    """metrics.csv rows, numbers as floats, empty cells as None."""
    with open(path, newline="") as f:
        return [{k: float(v) if v else None for k, v in row.items()} for row in csv.DictReader(f)]


# ---------------------------------------------------------------------------------- ensemble
def ensemble_accuracy(teacher_specs: list[str], val: Path, batch_size: int, device: str, workers: int) -> dict:
    """validate() (the loop `mealv2 eval` runs) on the ensemble `mealv2 label` stores: the mean of the
    teachers' softmax weighted by their specs' *W (common.data.targets.ensemble_probs), each teacher fed its own
    resolution's pixels re-normalised to its own mean/std."""
    import torch
    from torch import nn

    from .common.data.dataset import build_index
    from .common.models.runtime import Runtime
    from .common.data.targets import ensemble_probs
    from .common.models.teachers import load_teachers
    from .stage2_train.validate import validate

    index = build_index(val)
    teachers, _, _ = load_teachers(teacher_specs, index.classes)
    if len({t.res for t in teachers}) != 1:
        raise click.UsageError("the demo's ensemble row needs teachers of one resolution")
    m0, s0 = torch.tensor(teachers[0].mean).view(1, 3, 1, 1), torch.tensor(teachers[0].std).view(1, 3, 1, 1)

    class SoftmaxMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.models = nn.ModuleList(t.model for t in teachers)

        def forward(self, x):
            pixels = x * s0.to(x) + m0.to(x)
            logits = [t.logits((pixels - torch.tensor(t.mean).view(1, 3, 1, 1).to(x))
                               / torch.tensor(t.std).view(1, 3, 1, 1).to(x)) for t in teachers]
            return torch.log(ensemble_probs(logits, [t.weight for t in teachers], 1.0))

    runtime = Runtime.create(device)
    model = runtime.model(SoftmaxMean()).eval()
    with torch.no_grad():
        return validate(model, index, teachers[0].res, teachers[0].mean, teachers[0].std, runtime,
                        batch_size, workers)


# ---------------------------------------------------------------------------------- report
def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


TABLE_HEADER = ["model", "arch", "mode", "saw", "top-1 (%)", "top-5 (%)", "train time (s)", "img/s"]


def results_table(rows: list[dict]) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    return markdown_table(TABLE_HEADER, [[r["row"], r["arch"], r["mode"], r["saw"], fmt(r["top1"], ".2f"),
                                          fmt(r["top5"], ".2f"), fmt(r["train_s"], ".1f"),
                                          fmt(r["img_per_s"], ".0f")] for r in rows])


def stage_table(stages: dict, total: dict) -> str:
    rows = [[k, f"{v['wall_s']:.1f}", f"{v['cpu_s']:.1f}"] for k, v in stages.items()]
    return markdown_table(["stage", "wall (s)", "process CPU (s)"],
                          rows + [["total", f"{total['wall_s']:.1f}", f"{total['cpu_s']:.1f}"]])


def seed_noise(top1: dict[int, float]) -> dict:
    """The noise of one run from the top-1 of one student and budget over seeds (seed: top-1): their
    sample standard deviation, and the band that a gap between two single runs stays within by noise
    alone (NOISE_Z standard deviations of a difference)."""
    std = statistics.stdev(top1.values())
    return {"seeds": list(top1), "top1": list(top1.values()), "std": std, "band": NOISE_Z * math.sqrt(2) * std}


def verdict(gap: float, target: float, band: float) -> str:
    """A gap's target (gap >= target) judged against seed noise: within ``band`` of the target, a
    miss may be noise alone (another seed may meet it), so it is not called a miss."""
    if gap >= target:
        return "met"
    if gap + band >= target:
        return f"within seed noise of it (±{band:.2f})"
    return f"missed by more than seed noise (±{band:.2f})"


def gaps_of(rows: list[dict], noise: dict) -> dict:
    by = {r["row"]: r for r in rows}
    a = lambda mode: by[f"student A ({mode})"]
    return {"stored_minus_hard": a("stored")["top1"] - a("hard")["top1"],
            "stored_minus_online": a("stored")["top1"] - a("online")["top1"],
            "time_ratio_stored_online": a("stored")["train_s"] / a("online")["train_s"],
            "cpu_ratio_stored_online": a("stored")["train_cpu_s"] / a("online")["train_cpu_s"],
            "B_stored_minus_hard": by["student B (stored)"]["top1"] - by["student B (hard)"]["top1"],
            "seed_noise_std": noise["std"]}


TARGETS = {"stored_minus_hard": 2.0, "stored_minus_online": -1.0}   # top-1 points, gap >= target


def verdicts(g: dict, noise: dict) -> dict[str, str]:
    return {key: verdict(g[key], target, noise["band"]) for key, target in TARGETS.items()}


def gap_lines(g: dict, label_s: float, noise: dict) -> list[str]:
    said = verdicts(g, noise)
    target = lambda key: f"target >= {TARGETS[key]:+g}: {said[key]}"
    seeds = " / ".join(map(str, noise["seeds"]))
    return [f"student A, stored labels - hard labels: {g['stored_minus_hard']:+.2f} top-1 points "
            f"({target('stored_minus_hard')})",
            f"student A, stored labels - online MEAL V2: {g['stored_minus_online']:+.2f} top-1 points "
            f"({target('stored_minus_online')})",
            f"student A training time, stored / online: {g['time_ratio_stored_online']:.2f} wall (target <= 0.6), "
            f"{g['cpu_ratio_stored_online']:.2f} process CPU; "
            f"labelling, done once for every student: {label_s:.1f} s",
            f"student B, stored labels - hard labels: {g['B_stored_minus_hard']:+.2f} top-1 points",
            f"seed noise: student A on stored labels with seeds {seeds}: "
            f"{' / '.join(f'{v:.2f}' for v in noise['top1'])} top-1 (std {noise['std']:.2f}), so two single runs "
            f"differ by up to ±{noise['band']:.2f} points by noise alone ({NOISE_Z:g} std of a difference)"]


def plot_students(metrics: dict[str, list[dict]], path: Path, title: str) -> None:
    from matplotlib.figure import Figure   # object API: no pyplot, no global backend

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    top1, loss = fig.subplots(1, 2)
    for name, rows in metrics.items():
        epochs = [r["epoch"] + 1 for r in rows]
        line, = top1.plot(epochs, [r["val_top1"] for r in rows], marker="o", ms=3, label=name)
        loss.plot(epochs, [r["loss"] for r in rows], marker="o", ms=3, color=line.get_color(), label=name)
    top1.set(xlabel="epoch", ylabel="val top-1 (%)", title=title)
    loss.set(xlabel="epoch", ylabel="training loss (soft or hard cross-entropy)", title="training loss")
    for ax in (top1, loss):
        ax.grid(alpha=0.3)
    top1.legend(fontsize=8)
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class Settings:
    """The demo's flags (what `mealv2 demo --help` lists)."""

    out: str = "mealv2-demo"
    seed: int = 0
    images_per_class: int = 100
    val_per_class: int = 150
    teachers: str | None = None
    student: str = "test_resnet"
    student_b: str = "test_byobnet"
    epochs: int = 32
    noise_seeds: int = 2         # student A's stored-label run again with seeds seed+1..: the noise of one run
    rounds: int | None = None    # None: one per pass the students take (rounds_for)
    curve_per_class: int = 30
    crops_per_image: int = 2
    res: int = 32
    scale: str = "0.08,1"
    batch_size: int = 64
    topk: int = 5
    device: str = "auto"
    workers: int = 2

    def command(self) -> str:
        """The `mealv2 demo` line that repeats this run."""
        args = ["mealv2", "demo"]
        for key, value in asdict(self).items():
            if value is not None and value != getattr(DEFAULTS, key):
                args += [f"--{key.replace('_', '-')}", str(value)]
        return shlex.join(args)


DEFAULTS = Settings()


def run_demo(s: Settings) -> dict:
    """Every stage; returns results.json's content (also written, with report.md and curves.png)."""
    from . import LabelConfig, TrainConfig
    from .common.models.teachers import split_specs
    from .stage1_label.report import store_summary
    from .stage1_label.store_report import write_report
    from .stage2_train.evaluate import evaluate_model
    from .synthetic import SyntheticConfig, generate

    wall0, cpu0 = time.perf_counter(), time.process_time()
    out = Path(s.out)
    for sub in RUN_DIRS:   # a rerun starts its runs afresh; the dataset is reused when unchanged
        shutil.rmtree(out / sub, ignore_errors=True)
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    run = Runner()
    teachers = split_specs([s.teachers or ",".join(shipped_teachers())])

    with run.timed("generate dataset"):
        cfg = SyntheticConfig(seed=s.seed, train_per_class=s.images_per_class, val_per_class=s.val_per_class)
        paths = generate(out / "data", cfg)
    train_dir, val_dir = paths["train"], paths["val"]
    n_train = s.images_per_class * cfg.num_classes
    curve_val = curve_subset(val_dir, s.curve_per_class)
    passes = rounds_for(s.epochs, n_train, s.batch_size, s.crops_per_image)
    rounds = s.rounds or passes
    click.secho(f"dataset: {train_dir} ({n_train} images), {val_dir} ({s.val_per_class * cfg.num_classes} "
                f"images), {cfg.num_classes} classes: {', '.join(cfg.classes)}", bold=True)

    where = dict(device=s.device, workers=s.workers)
    store = out / "labels" / "store.zarr"
    crop = CropParams(res=s.res, scale=Pair().parse(s.scale))
    _, label_step = run.label("label", LabelConfig(
        data=str(train_dir), teachers=teachers, out=str(store), rounds=rounds, crops_per_image=s.crops_per_image,
        res=crop.res, scale=crop.scale, topk=min(s.topk, cfg.num_classes), seed=s.seed, **where))
    inspect, _ = run("label", ["inspect", store, "--json"], store_summary, store)
    report_dir = out / "labels" / "report"
    pictures, _ = run("store report", ["inspect", store, "--report", report_dir, "--data", train_dir], write_report,
                      store, report_dir, data=train_dir)

    # Online: `mealv2 label` above already ran the teacher check of these teachers on these images
    # (its time is the labelling's), so neither timed training pays it.
    fresh = dict(res=crop.res, scale=crop.scale, crops_per_image=s.crops_per_image)
    modes = {"stored": dict(labels=str(store)), "online": dict(teachers=teachers, teacher_check=False, **fresh),
             "hard": dict(hard_labels=True, **fresh)}
    # Rows in table order; trained hard-label first, so that the one-off costs of a process's first
    # training (imports, kernel set-up) fall on no run of the stored / online time comparison.
    students = [("A", s.student, ("stored", "online", "hard")), ("B", s.student_b, ("stored", "hard"))]
    runs, trained = {}, {}
    for letter, arch, arch_modes in students:
        for mode in arch_modes:
            runs[f"student {letter} ({mode})"] = out / "students" / f"{letter}_{arch}_{mode}"

    def student(arch: str, mode: str, folder: Path, seed: int, val: str | None) -> TrainConfig:
        opt, lr = recipe(arch)
        return TrainConfig(data=str(train_dir), out=str(folder), arch=arch, **modes[mode], epochs=s.epochs,
                           batch_size=s.batch_size, lr=lr, opt=opt, cos=True, warmup_epochs=1, val=val, seed=seed,
                           **where)

    for letter, arch, arch_modes in students:
        for mode in sorted(arch_modes, key=TRAIN_ORDER.index):
            name = f"student {letter} ({mode})"
            trained[name] = run.train(f"train student ({mode})",
                                      student(arch, mode, runs[name], s.seed, str(curve_val)))
    # The noise of one run: student A from the same store and budget with other seeds (init and order),
    # without the per-epoch curve (only last.pt is scored).
    noise_runs = {seed: out / "students" / f"A_{s.student}_stored_seed{seed}"
                  for seed in range(s.seed + 1, s.seed + 1 + s.noise_seeds)}
    noise_trained = {seed: run.train("train student (stored, seed noise)", student(s.student, "stored", folder,
                                                                                   seed, None))[1]
                     for seed, folder in noise_runs.items()}

    def evaluate(ckpt) -> tuple[dict, Step]:
        result, step = run("evaluate", ["eval", val_dir, "--checkpoint", ckpt, "--batch-size", 256,
                                        "--device", s.device, "--workers", s.workers, "--json"],
                           evaluate_model, val_dir, ckpt, batch_size=256, **where)
        click.echo(f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%")
        return result, step

    rows = []
    for i, spec in enumerate(teachers):
        result, step = evaluate(spec)
        rows.append(dict(row=f"teacher {i + 1}", arch=_arch_of(spec), mode="shipped checkpoint"
                         if spec in shipped_teachers() else "given checkpoint", saw=_teacher_saw(spec),
                         top1=result["top1"], top5=result["top5"], train_s=None, img_per_s=None,
                         eval=result, commands=[*_teacher_commands(spec), step.shell]))
    with run.timed("evaluate"):
        ens = ensemble_accuracy(teachers, val_dir, 256, s.device, s.workers)
    click.echo(f"\nensemble (the teachers' softmax, mean weighted by *W): top-1 {ens['top1']:.2f}%  "
               f"top-5 {ens['top5']:.2f}%")
    rows.append(dict(row="ensemble", arch=" + ".join(map(_arch_of, teachers)), mode="mean softmax", saw="-",
                     top1=ens["top1"], top5=ens["top5"], train_s=None, img_per_s=None, eval=ens,
                     commands=[s.command()]))
    saw = {"stored": f"{n_train} images' crops, store's soft labels", "hard": f"{n_train} images, labels",
           "online": f"{n_train} images, teachers online"}
    metrics = {}
    for name, folder in runs.items():
        result, step = evaluate(folder / "last.pt")
        metrics[name], train = trained[name]
        mode = name.split("(")[1].rstrip(")")
        rows.append(dict(row=name, arch=train.args[train.args.index("--arch") + 1], mode=mode, saw=saw[mode],
                         top1=result["top1"], top5=result["top5"], train_s=train.seconds,
                         train_cpu_s=train.cpu_seconds,
                         img_per_s=sorted(r["img_per_s"] for r in metrics[name])[len(metrics[name]) // 2],
                         eval=result, metrics=metrics[name],
                         commands=([label_step.shell] if mode == "stored" else []) + [train.shell, step.shell]))

    noise_top1 = {s.seed: next(r for r in rows if r["row"] == "student A (stored)")["top1"]}
    noise_commands = []
    for seed, folder in noise_runs.items():
        result, step = evaluate(folder / "last.pt")
        noise_top1[seed] = result["top1"]
        noise_commands += [noise_trained[seed].shell, step.shell]
    noise = {**seed_noise(noise_top1), "commands": noise_commands}

    total = {"wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0}
    gaps = gaps_of(rows, noise)
    teacher_res = sorted({r["eval"]["res"] for r in rows if r["row"].startswith("teacher")})
    results = {"settings": asdict(s), "command": s.command(), "rows": rows, "gaps": gaps,
               "verdicts": verdicts(gaps, noise), "seed_noise": noise, "passes": passes,
               "teacher_res": "/".join(map(str, teacher_res)), "label_s": label_step.seconds, "store": inspect,
               "store_report": {(report_dir / name).relative_to(out).as_posix(): what for name, what in pictures.items()},
               "stages": run.stages, "total": total,
               "machine": machine(s.device), "commands": [st.shell for st in run.steps]}
    curve_n = min(s.curve_per_class, s.val_per_class)
    plot_students(metrics, out / "curves.png",
                  f"val top-1 on {curve_n} images per class, {s.epochs} epochs of {n_train} crops")
    (out / "report.md").write_text(report_text(results))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    click.secho("\nResults on the val split (MEAL V2 test protocol: resize res/0.875, center crop res)", bold=True)
    click.echo(results_table(rows))
    click.echo("")
    for line in gap_lines(gaps, label_step.seconds, noise):
        click.secho(line, bold=True)
    click.echo("")
    click.echo(stage_table(run.stages, total))
    click.echo(store_line(inspect))
    click.echo(f"\nwrote {out / 'report.md'}, {out / 'curves.png'} and {out / 'results.json'}")
    click.secho(f"mealv2 demo: {total['wall_s']:.0f} s in all ({total['cpu_s']:.0f} s of process CPU)", bold=True)
    return results


def _arch_of(spec: str) -> str:
    from .common.models.checkpoints import load_checkpoint_file
    from .common.models.teachers import Spec

    return str(load_checkpoint_file(Spec.parse(spec).body)["arch"])


def _teacher_info(spec: str) -> dict | None:
    """The shipped teachers' entry in demo_teachers/teachers.json (None for other checkpoints)."""
    from .common.models.teachers import Spec

    path = Path(Spec.parse(spec).body)
    if path.parent != SHIPPED_TEACHERS:
        return None
    info = json.loads((SHIPPED_TEACHERS / "teachers.json").read_text())
    return {**info["teachers"][path.stem], "build_command": info["build_command"]}


def _teacher_saw(spec: str) -> str:
    info = _teacher_info(spec)
    return "-" if info is None else info["saw"]


def _teacher_commands(spec: str) -> list[str]:
    info = _teacher_info(spec)
    return [] if info is None else [info["build_command"], *info["commands"]]


def machine(device: str = "auto") -> str:
    """The machine, as the benchmarks describe it (with the GPU's name when one is used)."""
    import torch

    from .common.models.runtime import machine_description

    return machine_description("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


def store_line(st: dict) -> str:
    return (f"label store: {st['bytes_on_disk'] / 1024:.1f} KiB on disk, {st['bytes_per_crop']} bytes per crop, "
            f"{st['crops']} crops ({st['rounds_complete']} rounds x {st['num_images']} images x "
            f"{st['crops_per_image']} crops), top-{st['topk']}; the ensemble's top-1 is the image's label on "
            f"{100 * st['top1_agreement']:.1f}% of round 0's crops")


STORE_PICTURE = "labels/report/disputed.png"   # the store report's picture shown in the demo's report


def store_report_table(pictures: dict[str, str]) -> str:
    """The store report's files, linked, and what each shows."""
    return markdown_table(["file", "what it shows"], [[f"[{Path(f).name}]({f})", what] for f, what in pictures.items()])


def replay_text(r: dict) -> str:
    rounds, passes = r["store"]["rounds_complete"], r["passes"]
    if rounds >= passes:
        return (f"The store holds a round of crops for each of the {passes} passes over the images that the "
                f"students take, and round p is what the sampler draws for pass p in every mode: the students "
                f"of one architecture see the same crops in the same order, and only the targets differ.")
    return (f"The stored-label students replay the store's {rounds} rounds of crops (pass p replays round "
            f"p mod {rounds}) over their {passes} passes; the online and hard-label students draw new crops "
            f"every pass.")


def report_text(r: dict) -> str:
    s = r["settings"]
    reproduce = []
    for row in r["rows"]:
        reproduce += [f"# {row['row']}", *row["commands"], ""]
    noise = r["seed_noise"]
    reproduce += [f"# student A (stored), seeds {', '.join(map(str, noise['seeds'][1:]))}: seed noise",
                  *noise["commands"], ""]
    return f"""# mealv2 demo report

`{r['command']}`

Dataset (mealv2/synthetic.py, seed {s['seed']}): 10 classes of shapes and textures drawn in random
colours (colour says nothing about the class) at random places, sizes and angles among distractor
blobs and lines, with pixel noise, as JPEGs of varied size; half of the images also hold a smaller
object of another class, and the label names the larger one, so a random crop may show only the
other object. {s['images_per_class']} train and {s['val_per_class']} val images per class.

## Results

Top-1/top-5 on the val split ({s['val_per_class']} images per class) with MEAL V2's test protocol
(`mealv2 eval`: resize to res/0.875, center crop res). Every model is scored at its last epoch
(`last.pt`): the val split selects nothing. The ensemble row is the same validate() on the mean of
the teachers' softmax. The teachers were trained once, longer, on more images of another seed and
at {r['teacher_res']} px (their "saw" column), and ship with the package; they see every crop at
{r['teacher_res']} px, the students at {s['res']} px. Each student of one architecture gets the same
epochs ({s['epochs']} epochs of N crops), crops ({s['crops_per_image']} per image, scale {s['scale']}),
batch ({s['batch_size']} crops), optimiser and lr, cosine schedule with one warm-up epoch and seed.
{replay_text(r)} Small crops are where a one-hot label is most often wrong for what a crop shows
(the ensemble's top-1 is the image's label on {100 * r['store']['top1_agreement']:.1f}% of round 0's
crops): with milder crops (`--scale`) the hard-label baseline gains more than the distilled
students (BENCHMARKS.md, "Crop scale"). Train time is the wall time of the `mealv2 train`
command (its per-epoch validation on {min(s['curve_per_class'], s['val_per_class'])} val images per
class, for curves.png, and its checkpoints included, the same in every mode); img/s is the
trainer's median training throughput.
So that the stored / online comparison is like for like, the hard-label runs are trained first
(the one-off costs of the first training in the process, imports and kernel set-up, fall on
them), and the online run skips the teacher check (`--no-teacher-check`) that `mealv2 label`
already ran on these teachers and images (its time is the labelling's). On a machine shared
with other work, wall times move with the load (so does process CPU, by the threads' spin-waits);
compare the rows' img/s as well.

{results_table(r['rows'])}

One seed of {s['epochs']} epochs moves a student's top-1 by points (the seed sets its initial
weights and the order of its steps), so each top-1 target is judged against that noise: student A
is trained from the store again with seeds {', '.join(map(str, r['seed_noise']['seeds'][1:]))} (same crops
and budget; cheap, no teacher runs), and a gap between two single runs that misses its target by
less than {r['seed_noise']['band']:.2f} points ({NOISE_Z:g} standard deviations of a difference) is not
called a miss: another seed could meet it. `mealv2 bench demo` shows the verdicts over seeds.

{chr(10).join('- ' + line for line in gap_lines(r['gaps'], r['label_s'], r['seed_noise']))}

![val top-1 and training loss per epoch](curves.png)

## Time per stage

{stage_table(r['stages'], r['total'])}

Machine: {r['machine']}.

## Label store

{store_line(r['store'])}. What the teachers' labels look like (`mealv2 inspect --report`):

{store_report_table(r['store_report'])}

![{r['store_report'][STORE_PICTURE]}]({STORE_PICTURE})

## Commands to reproduce every row

```sh
{chr(10).join(reproduce).rstrip()}
```
"""


# ---------------------------------------------------------------------------------- teachers
def train_teachers(dest: Path, device: str, workers: int) -> None:
    """Train the shipped teachers with `mealv2 train --hard-labels` on their own generated data
    (TEACHER_DATA, in DEST/data; runs in DEST/runs), then write them to ``dest``
    (:func:`write_teachers`). Every recorded command names only paths under DEST, which the
    build command creates, so the list reruns as recorded from any folder."""
    from . import TrainConfig
    from .synthetic import SyntheticConfig, generate

    paths = generate(dest / "data", SyntheticConfig(**TEACHER_DATA))
    run = Runner()
    done = []
    for name, arch, opt, lr, seed, res in TEACHER_RECIPES:
        folder = dest / "runs" / name
        shutil.rmtree(folder, ignore_errors=True)
        _, step = run.train("train teachers", TrainConfig(
            data=str(paths["train"]), out=str(folder), arch=arch, hard_labels=True, epochs=TEACHER_EPOCHS,
            res=res, scale=Pair().parse(DEFAULTS.scale), crops_per_image=DEFAULTS.crops_per_image,
            batch_size=DEFAULTS.batch_size, lr=lr, opt=opt, cos=True,
            warmup_epochs=1, val=str(paths["val"]), seed=seed, device=device, workers=workers))
        done.append((name, arch, folder, step.shell, step.seconds))
    write_teachers(dest, done)


def write_teachers(dest: Path, runs: list[tuple[str, str, Path, str, float]]) -> None:
    """Slim fp16 mealv2 checkpoints DEST/NAME.pt (weights, res, mean/std, classes: no optimizer
    state) of the runs (name, arch, run folder, command, seconds), and teachers.json: what each
    saw, its commands, time and top-1 on its own val split, and the machine that built it."""
    from .common.models.checkpoints import load_checkpoint_file, model_from_mealv2_checkpoint, save_checkpoint

    dest.mkdir(parents=True, exist_ok=True)
    n = TEACHER_DATA["train_per_class"] * 10
    info = {"build_command": shlex.join(["mealv2", "demo", "--build-teachers", str(dest)]),
            "data": TEACHER_DATA, "teachers": {}}
    info["machine"] = machine()
    for name, arch, folder, command, seconds in runs:
        ckpt = load_checkpoint_file(folder / "last.pt")
        model = model_from_mealv2_checkpoint(ckpt, str(folder / "last.pt")).half()
        save_checkpoint(dest / f"{name}.pt", model=model, arch=arch, classes=ckpt["classes"], res=ckpt["res"],
                        mean=ckpt["mean"], std=ckpt["std"])
        info["teachers"][name] = {
            "arch": arch, "saw": f"{n} other images, labels, {TEACHER_EPOCHS} ep, {ckpt['res']} px",
            "commands": [command],
            "train_s": round(seconds, 1),
            "own_val_top1": read_metrics(folder / "metrics.csv")[-1]["val_top1"]}
    (dest / "teachers.json").write_text(json.dumps(info, indent=2) + "\n")
    click.echo(f"wrote {', '.join(f'{name}.pt' for name, *_ in runs)} and teachers.json to {dest}; the "
               f"package ships them in {SHIPPED_TEACHERS} (copy them there)")


# ---------------------------------------------------------------------------------- command
@click.command()
@click.option("--out", "-o", default=DEFAULTS.out, show_default=True, type=click.Path(file_okay=False),
              help="Folder for the dataset, the runs, the label store, report.md, curves.png, results.json.")
@click.option("--seed", type=click.IntRange(0, 999), default=DEFAULTS.seed, show_default=True,
              help="Seed of the dataset, the crops and the students (the teachers' data uses seed 1000).")
@click.option("--images-per-class", type=POSITIVE, default=DEFAULTS.images_per_class, show_default=True,
              help="Train images per class.")
@click.option("--val-per-class", type=POSITIVE, default=DEFAULTS.val_per_class, show_default=True,
              help="Val images per class: the table's top-1/top-5.")
@click.option("--curve-per-class", type=POSITIVE, default=DEFAULTS.curve_per_class, show_default=True,
              help="Val images per class that the students score every epoch (curves.png).")
@click.option("--teachers", default=None,
              help="Comma-separated mealv2 checkpoints of one resolution [default: the two shipped in "
                   "mealv2/demo_teachers, made by --build-teachers].")
@click.option("--student", default=DEFAULTS.student, show_default=True, help="Student A: timm architecture.")
@click.option("--student-b", default=DEFAULTS.student_b, show_default=True,
              help="Student B: another timm architecture, trained from the same store.")
@click.option("--epochs", type=POSITIVE, default=DEFAULTS.epochs, show_default=True,
              help="Epochs of N crops of every student.")
@click.option("--noise-seeds", type=POSITIVE, default=DEFAULTS.noise_seeds, show_default=True,
              help="Student A's stored-label run again with this many other seeds: the noise of one run, "
                   "against which the top-1 targets are judged.")
@click.option("--rounds", type=POSITIVE, default=DEFAULTS.rounds,
              help="Label rounds; pass p over the images replays round p mod R [default: the passes the "
                   "students take, so that no stored crop repeats and every mode sees the same crops].")
@click.option("--crops-per-image", type=POSITIVE, default=DEFAULTS.crops_per_image, show_default=True)
@click.option("--res", type=POSITIVE, default=DEFAULTS.res, show_default=True,
              help="Crop side of the store and the students (each teacher sees the crop at its own res: "
                   "64 px for the shipped ones).")
@click.option("--scale", default=DEFAULTS.scale, show_default=True, help="Random-resized-crop area range.")
@click.option("--batch-size", type=POSITIVE, default=DEFAULTS.batch_size, show_default=True,
              help="Crops per step; a multiple of --crops-per-image.")
@click.option("--topk", type=POSITIVE, default=DEFAULTS.topk, show_default=True, help="Classes stored per crop.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=DEFAULTS.device, show_default=True)
@click.option("--workers", type=POSITIVE, default=DEFAULTS.workers, show_default=True, help="Decoding threads.")
@click.option("--build-teachers", type=click.Path(file_okay=False), default=None,
              help="Instead of the demo: generate the teachers' data and train the shipped teachers in "
                   "this folder (their .pt files and teachers.json are what mealv2/demo_teachers ships).")
def demo(build_teachers, **flags):
    """Label once, train many students: stored labels against online MEAL V2 and hard labels,
    on a generated dataset, on a CPU in about 4 minutes.

    Stores the soft labels of two shipped teachers for random crops, trains student A from the
    store, online from the teachers and on hard labels, student B from the same store and on
    hard labels, evaluates everything and writes OUT/report.md, OUT/curves.png and
    OUT/results.json, and the store's report (pictures of its labels) in OUT/labels/report. Every stage calls mealv2's Python API, printed before it runs as the
    equivalent `mealv2` command (report.md lists them)."""
    if build_teachers:
        train_teachers(Path(build_teachers), flags["device"], flags["workers"])
        return
    run_demo(Settings(**flags))
