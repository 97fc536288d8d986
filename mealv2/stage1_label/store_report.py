"""`mealv2 inspect STORE --report DIR`: DIR/report.md and the PNG pictures it links, readable on GitHub
and in a file browser. The numbers come from store_stats.py over every complete round; this module only
draws them (matplotlib's object API: no pyplot, no display, no server) and writes the markdown. With
``--data``, the contact sheets show the crops themselves, cut from DATA's images by the stored boxes.
"""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..common.data.crops import boxes_to_relative
from ..common.data.dataset import build_index
from ..common.errors import MealV2Error
from ..common.store.label_store import LabelStore
from .report import dataset_mismatch, run_lines, store_summary
from .store_stats import BINS, LayerStats, class_rows, round_stats

NAMED_CLASSES = 30     # classes drawn by name; with more, per-class values are drawn sorted
LISTED_CLASSES = 10    # with more than NAMED_CLASSES, the classes report.md lists (the lowest)
SHEET_TILES = 12       # crops per contact sheet
SHEET_COLUMNS = 4
SHOWN_CLASSES = 3      # stored classes written under a crop
DPI = 80


def layer_stats(store: LabelStore) -> dict[str, LayerStats]:
    """Each label layer's statistics over the store's complete rounds, by layer name. A store holds one
    layer, the ensemble's; the report draws a section per layer, so layers of single teachers get theirs."""
    a = store.attrs
    labels, classes, layers = store.labels(), len(a["classes"]), store.readable_layers()
    names = {None: "ensemble", **{j: f"teacher {j + 1}" for j in layers}}
    totals = {name: LayerStats(classes, a["topk"]) for name in names.values()}
    for r in range(store.rounds_complete()):
        d = store.read_round(r, layers=layers)
        for j, name in names.items():
            ids, codes = (d.ids, d.probs) if j is None else d.layers[j]
            totals[name] = totals[name] + round_stats(r, d.boxes, d.flips, ids, codes, labels, classes)
    return totals


def write_report(path, out, data=None) -> dict[str, str]:
    """Write ``out``/report.md and its pictures for the store at ``path`` (local or a URL); ``data``: the
    dataset it was labelled from, to draw the contact sheets. Returns {file in ``out``: what it shows},
    report.md first, then each picture."""
    store = LabelStore.open(path)
    if not store.rounds_complete():
        raise MealV2Error(f"{store.path}: no complete round to report on yet; finish it by re-running the store's "
                          f"`mealv2 label` command:\n  {store.label_command()}")
    index = None
    if data is not None:
        index = build_index(data, skip_bad=bool(store.attrs["dataset"]["skipped"]))
        if problem := dataset_mismatch(store, data, index):
            raise MealV2Error(f"{problem}: pass --data the dataset {store.path} was labelled from")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_previous(out)
    layers = layer_stats(store)
    pictures: dict[str, str] = {}
    sections = [layer_section(store, name, stats, out, pictures,
                              prefix="" if len(layers) == 1 else f"{name.replace(' ', '')}-")
                for name, stats in layers.items()]
    picks = sheet_picks(layers["ensemble"])
    sheets = [sheet_section(store, sheet, picks[sheet[0]], out, pictures, index) for sheet in SHEETS]
    (out / "report.md").write_text("\n\n".join([header(store, path, data), *sections,
                                                teacher_section(store, out, pictures), *sheets])
                                   + "\n")
    return {"report.md": f"the report on {store.name}", **pictures}


def remove_previous(out: Path) -> None:
    """Delete the report in ``out`` and the files it links (its pictures and tables: file names in ``out``),
    which a new report, of another store or layers, would not all overwrite and leave beside itself; the
    folder's other files are left."""
    old = out / "report.md"
    if not old.is_file():
        return
    owned = {link for link in re.findall(r"\]\(([^)\s/]+)\)", old.read_text(errors="replace"))
             if (out / link).is_file()}
    for name in (*owned, "report.md"):
        (out / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- report.md
def header(store: LabelStore, path, data) -> str:
    a, summary = store.attrs, store_summary(path)
    rounds, n, c = store.rounds_complete(), store.num_images, a["crops_per_image"]
    rows = [("store", f"`{store.path}`"),
            ("crops", f"{rounds * n * c:,} ({rounds} complete rounds of {store.rounds_planned} planned x {n:,} images "
                      f"x {c} crops)"),
            ("classes", f"{len(a['classes']):,}; stored per crop: the top {a['topk']} and the leftover mass"),
            ("teachers", ", ".join(f"`{t['spec']}`" for t in a["teachers"]) + f" (temperature {a['temperature']})"),
            ("crop", f"{a['crop']['res']} px, scale {a['crop']['scale']}, ratio "
                     f"{[round(r, 3) for r in a['crop']['ratio']]}"),
            ("bytes per crop", "-" if summary["bytes_per_crop"] is None else summary["bytes_per_crop"]),
            ("labelling runs", "<br>".join(run_lines(store.runs())))]
    command = f"mealv2 inspect {path} --report DIR" + (f" --data {data}" if data else "")
    return "\n".join([f"# Label store report: {store.name}", "", f"`{command}`", "",
                      markdown_table(["", ""], rows)])


def layer_section(store: LabelStore, name: str, s: LayerStats, out: Path, pictures: dict, prefix: str) -> str:
    """The figures and per-class table of one layer; writes its pictures (added to ``pictures``) and its
    classes CSV into ``out``."""
    classes = store.attrs["classes"]
    rows = class_rows(s, classes)
    k, mean_kth = s.topk, s.cum[-1] / s.crops - (s.cum[-2] / s.crops if s.topk > 1 else 0)
    files = {"confidence": f"{prefix}confidence.png", "mass": f"{prefix}topk_mass.png",
             "classes": f"{prefix}classes.png", "csv": f"{prefix}classes.csv"}
    for key, draw, what in (("confidence", draw_confidence, "top-1 probability and entropy"),
                            ("mass", draw_topk_mass, f"mass of the stored top-{k}"),
                            ("classes", draw_classes, "per class: top-1 probability, entropy"
                                                      + (", top-1 = label" if s.labelled else ""))):
        draw(s, classes, out / files[key])
        pictures[files[key]] = f"the {name}'s labels: {what}"
    write_classes_csv(rows, out / files["csv"])
    lines = [f"## The {name}'s labels", "",
             f"Over {s.crops:,} crops:", "",
             f"- top-1 probability: mean {s.p1 / s.crops:.3f}; below 0.5 on "
             f"{percent(s.p1_hist[:BINS // 2].sum() / s.crops)} of crops",
             f"- entropy of the training target: mean {s.entropy / s.crops:.3f} nats (uniform over the classes: "
             f"{s.max_entropy:.3f})",
             f"- the stored top {k} keep {percent(s.kept / s.crops)} of the mass on average, less than 90 % on "
             f"{percent(s.kept_hist[:int(BINS * 0.9)].sum() / s.crops)} of crops; the last stored class (rank {k}) "
             f"holds {percent(mean_kth)} on average, so a class more (`--topk {k + 1}`) would keep at most that much "
             f"more"]
    if s.labelled:
        lines.append(f"- top-1 is the image's label on {percent(s.hits / s.labelled)} of {s.labelled:,} crops "
                     f"of labelled images")
    by = "label" if s.labelled else "top-1 class (the store has no labels)"
    lines += ["", f"![{pictures[files['confidence']]}]({files['confidence']})", "",
              f"![{pictures[files['mass']]}]({files['mass']})", "",
              f"### Per class (by the image's {by})", "", f"![{pictures[files['classes']]}]({files['classes']})", ""]
    shown = rows if len(rows) <= NAMED_CLASSES else sorted(rows, key=class_order)[:LISTED_CLASSES]
    lowest = f"the {len(shown)} with the lowest {'agreement with the labels' if s.labelled else 'top-1 probability'}"
    lines += [f"All {len(rows)} classes are in [{files['csv']}]({files['csv']}); "
              f"{'here' if len(shown) == len(rows) else lowest}:", ""]
    header = ["class", "crops", "mean top-1 probability", "mean entropy"] + (["top-1 = label"] if s.labelled else [])
    lines.append(markdown_table(header, [[r.name, f"{r.crops:,}", f"{r.p1:.3f}", f"{r.entropy:.3f}"]
                                         + ([percent(r.accuracy)] if s.labelled else []) for r in shown]))
    return "\n".join(lines)


def class_order(row) -> tuple:
    return (row.accuracy if row.accuracy is not None else row.p1, row.p1)


def teacher_section(store: LabelStore, out: Path, pictures: dict) -> str:
    a = store.attrs
    checks = {c["teacher"]: c for c in a.get("teacher_check") or []}
    kept, layers = store.layers_with_ensemble(), store.readable_layers()

    def check(c) -> str:
        return ("not recorded" if c is None else f"skipped ({c.get('why', '--no-teacher-check')})"
                if c.get("skipped") else f"{percent(c['agreement'])} of {c['crops']} sampled crops ({c['verdict']})")

    rows = [[str(i + 1) if i in kept else "-", f"`{t['spec']}`", t["arch"], str(t["res"]), str(t["weight"]),
             check(checks.get(t["spec"]))] for i, t in enumerate(a["teachers"])]
    rows += [[str(j + 1), f"`{store.layers[j]['teacher']['spec']}`", store.layers[j]["teacher"]["arch"],
              str(store.layers[j]["teacher"]["res"]), "- (added)", check(store.layers[j].get("teacher_check"))]
             for j in layers if j not in kept]
    table = markdown_table(["layer", "teacher", "arch", "res", "weight", "teacher check: top-1 = label"], rows)
    if not layers:
        return "\n".join(["## Teachers", "",
                          "The store keeps the ensemble's labels (one layer): the figures above are the ensemble's. "
                          "Each teacher's own top-1 agreement with the labels is the teacher check's, measured on "
                          "sampled crops before labelling. Labelling with `mealv2 label --keep-teachers` keeps each "
                          "teacher's own labels too, and this report then gives each teacher's accuracy against the "
                          "labels over every stored crop and where the teachers agree, class by class.", "", table])
    agreement = teacher_agreement(store, layers)
    if agreement["agree"] is None and agreement["hits"] is None:
        return "\n".join(["## Teachers", "", "One teacher's own labels and no image labels: nothing to compare "
                                             "them with (its section is above).", "", table])
    pictures["teachers.png"] = "each teacher's top-1 accuracy" + (" and the teachers' agreement" if len(layers) > 1
                                                                  else "") + ", per class"
    draw_agreement(agreement, a["classes"], out / "teachers.png")
    how = ("keeps each teacher's own labels (`--keep-teachers`" if kept else
           "keeps the labels of the teachers added to it (`--add-teacher`")
    return "\n".join(["## Teachers", "",
                      f"The store {how}; their sections above, layer N as `teacher N`, the N-th weight of "
                      "`train --teacher-weights`). Over every stored crop: each teacher's top-1 against the image's "
                      "label (where DATA has labels), and with two layers or more the share of crops whose top-1 all "
                      "of them agree on, per class (of the image's label, or of the ensemble's top-1 for unlabelled "
                      "images).", "", table, "",
                      f"![{pictures['teachers.png']}](teachers.png)", "", agreement_table(agreement, a["classes"])])


def teacher_agreement(store: LabelStore, layers: list[int]) -> dict:
    """Over the complete rounds: per class (the image's label, or the ensemble's top-1 without one) its crops,
    the crops whose top-1 all teachers of ``layers`` share (None for one layer), and per teacher the crops whose
    top-1 is the label (None without labels)."""
    classes = len(store.attrs["classes"])
    labels = store.labels()
    crops, agree = np.zeros(classes, np.int64), np.zeros(classes, np.int64)
    hits = np.zeros((len(layers), classes), np.int64)
    for r in range(store.rounds_complete()):
        d = store.read_round(r, layers=layers)
        top1 = np.stack([d.layers[j][0][..., 0] for j in layers]).astype(np.int64)   # (T, N, C)
        labelled = labels >= 0
        of = np.where(labelled[:, None], labels[:, None], d.ids[..., 0].astype(np.int64))   # (N, C)
        crops += np.bincount(of.ravel(), minlength=classes)
        agree += np.bincount(of.ravel(), weights=(top1 == top1[:1]).all(axis=0).ravel(), minlength=classes).astype(np.int64)
        for t in range(len(layers)):
            right = (top1[t] == labels[:, None]) & labelled[:, None]
            hits[t] += np.bincount(of.ravel(), weights=right.ravel(), minlength=classes).astype(np.int64)
    has_labels = bool((labels >= 0).any())
    return {"teachers": [store.layers[j]["teacher"]["spec"] for j in layers], "layers": layers, "crops": crops,
            "agree": agree if len(layers) > 1 else None, "hits": hits if has_labels else None}


def agreement_table(g: dict, classes) -> str:
    """report.md's table of :func:`teacher_agreement`: a row per class with crops, then the whole store."""
    def cells(crops, agree, hits) -> list[str]:
        return [f"{crops:,}", *([percent(agree / crops) if crops else "-"] if agree is not None else []),
                *([percent(h / crops) if crops else "-" for h in hits] if hits is not None else [])]
    hits, agree = g["hits"], g["agree"]
    rows = [[name, *cells(g["crops"][c], None if agree is None else agree[c], None if hits is None else hits[:, c])]
            for c, name in enumerate(classes) if g["crops"][c]]
    rows.append(["**all**", *cells(g["crops"].sum(), None if agree is None else agree.sum(),
                                   None if hits is None else hits.sum(axis=1))])
    head = ["class", "crops", *(["teachers agree on top-1"] if agree is not None else []),
            *([f"teacher {j + 1} top-1 = label" for j in g["layers"]] if hits is not None else [])]
    return markdown_table(head, rows)


def draw_agreement(g: dict, classes, path: Path) -> None:
    """Per class: the teachers' agreement on top-1 and, with labels, each teacher's top-1 accuracy."""
    shown = [c for c in range(len(classes)) if g["crops"][c]]
    crops = np.maximum(g["crops"][shown], 1)
    series = [("all teachers agree on top-1", g["agree"][shown] / crops)] if g["agree"] is not None else []
    if g["hits"] is not None:
        series += [(f"teacher {j + 1} top-1 = label", g["hits"][t, shown] / crops) for t, j in enumerate(g["layers"])]
    fig = Figure(figsize=(max(6.0, 0.4 * len(shown) * len(series) / 2), 3.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(series)
    for i, (what, values) in enumerate(series):
        ax.bar(np.arange(len(shown)) + i * width, values, width, label=what)
    ax.set_xticks(np.arange(len(shown)) + 0.4 - width / 2, [_short(classes[c]) for c in shown], rotation=60, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of the class's crops", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=DPI)


SHEETS = (("disputed", "Crops the teachers dispute most",
           "The largest probabilities of the ensemble's second class: where its teachers' votes split between "
           "two classes."),
          ("unsure", "Least confident crops", "The lowest top-1 probabilities of the ensemble."))


def sheet_section(store: LabelStore, sheet: tuple, picks: np.ndarray, out: Path, pictures: dict, index) -> str:
    """A contact sheet's table of ``picks`` (and with ``index``, DATA's, its picture, added to ``pictures``)."""
    name, title, why = sheet
    classes, labels = store.attrs["classes"], store.labels()
    relpaths = index.relpaths if index is not None else store.relpaths()
    lines = [f"## {title}", "", f"{why} Over all complete rounds; a crop is shown once, in the first sheet that "
                                 f"picks it.", ""]
    if index is not None:
        draw_sheet(picks, index, classes, labels, store.attrs["crop"]["res"], out / f"{name}.png")
        pictures[f"{name}.png"] = f"{title.lower()}, cut from DATA"
        lines += [f"![{pictures[f'{name}.png']}]({name}.png)", ""]
    else:
        lines += ["Pass `--data DATA` (the dataset the store was labelled from) to draw these crops.", ""]
    rows = [[str(n + 1), f"`{relpaths[p['image']]}`" if relpaths else str(p["image"]), str(p["round"]),
             str(p["crop"]), "-" if labels[p["image"]] < 0 else classes[labels[p["image"]]],
             ", ".join(f"{classes[i]} {v:.2f}" for i, v in zip(p["ids"][:SHOWN_CLASSES], p["probs"])),
             " ".join(f"{v:.3f}" for v in boxes_to_relative(p["box"])), "yes" if p["flip"] else "no"]
            for n, p in enumerate(picks)]
    lines.append(markdown_table(["#", "image", "round", "crop", "label", "stored top classes", "box (y x h w)",
                                 "mirrored"], rows))
    return "\n".join(lines)


def sheet_picks(s: LayerStats) -> dict[str, np.ndarray]:
    """Each sheet's crops, by name: its lowest scores, leaving out those an earlier sheet shows."""
    shown, sheets = set(), {}
    for name, *_ in SHEETS:
        where = [(int(p["round"]), int(p["image"]), int(p["crop"])) for p in getattr(s, name)]
        fresh = [i for i, w in enumerate(where) if w not in shown][:SHEET_TILES]
        sheets[name] = getattr(s, name)[fresh]
        shown.update(where[i] for i in fresh)
    return sheets


def percent(x: float) -> str:
    return f"{100 * x:.1f} %"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(map(str, r)) + " |" for r in rows)])


def write_classes_csv(rows, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "crops", "mean_top1_probability", "mean_entropy", "top1_is_label"])
        w.writerows([r.name, r.crops, f"{r.p1:.4f}", f"{r.entropy:.4f}",
                     "" if r.accuracy is None else f"{r.accuracy:.4f}"] for r in rows)


# ---------------------------------------------------------------------------------- pictures
def _histogram(ax, counts: np.ndarray, hi: float, xlabel: str) -> None:
    edges = np.linspace(0, hi, len(counts) + 1)
    ax.bar(edges[:-1], counts / counts.sum(), width=edges[1] - edges[0], align="edge", color="#4c72b0")
    ax.set(xlabel=xlabel, ylabel="share of crops", xlim=(0, hi))
    ax.grid(alpha=0.3)


def draw_confidence(s: LayerStats, classes, path: Path) -> None:
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    p1, entropy = fig.subplots(1, 2)
    _histogram(p1, s.p1_hist, 1, "stored top-1 probability")
    p1.set_title(f"top-1 probability (mean {s.p1 / s.crops:.2f})")
    _histogram(entropy, s.entropy_hist, s.max_entropy, "entropy of the training target (nats)")
    entropy.set_title(f"entropy (mean {s.entropy / s.crops:.2f}; uniform {s.max_entropy:.2f})")
    fig.savefig(path, dpi=DPI)


def draw_topk_mass(s: LayerStats, classes, path: Path) -> None:
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    kept, per_rank = fig.subplots(1, 2)
    _histogram(kept, s.kept_hist, 1, f"mass kept by the stored top {s.topk} (1 - leftover)")
    kept.set_title(f"mass the top {s.topk} keep (mean {s.kept / s.crops:.3f})")
    mean = np.diff(s.cum, prepend=0) / s.crops
    ranks = [str(j + 1) for j in range(s.topk)] + ["rest"]
    bars = per_rank.bar(ranks, [*mean, 1 - s.kept / s.crops], color=["#4c72b0"] * s.topk + ["#c44e52"])
    per_rank.bar_label(bars, fmt="%.3f", fontsize=7)
    per_rank.set(xlabel="stored class (by rank), then the leftover mass", ylabel="mean probability",
                 title="mean mass per stored class")
    per_rank.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=DPI)


def draw_classes(s: LayerStats, classes, path: Path) -> None:
    rows = class_rows(s, classes)
    measures = [("mean top-1 probability", [r.p1 for r in rows]), ("mean entropy (nats)", [r.entropy for r in rows])]
    if rows and rows[0].accuracy is not None:
        measures.append(("top-1 = label", [r.accuracy for r in rows]))
    named = len(rows) <= NAMED_CLASSES
    fig = Figure(figsize=(max(6.0, 0.32 * len(rows)) if named else 10, 2.4 * len(measures) + (1 if named else 0)),
                 layout="constrained")
    for ax, (what, values) in zip(fig.subplots(len(measures), 1, sharex=True, squeeze=False)[:, 0], measures):
        if named:
            ax.bar([r.name for r in rows], values, color="#4c72b0")
            ax.tick_params(axis="x", labelrotation=60, labelsize=8)
        else:   # too many names to read: each measure's values sorted, a class per point
            ax.plot(np.sort(values), color="#4c72b0")
            ax.set_xlabel("classes, sorted by this value")
        ax.set_ylabel(what, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=DPI)


def draw_sheet(picks: np.ndarray, index, classes, labels, res: int, path: Path) -> None:
    """Each picked crop twice: its image with the box drawn, and the crop as the teachers saw it (cut by
    the box, resized to the store's res, mirrored when flipped), with its label and stored top classes."""
    from PIL import Image, ImageOps

    from ..common.data.loaders.base import decode_rgb   # the loaders' reference decode (EXIF, 16-bit, RGB)

    rows = max(1, math.ceil(len(picks) / SHEET_COLUMNS))
    fig = Figure(figsize=(3.4 * SHEET_COLUMNS, 2.3 * rows), layout="constrained")
    axes = fig.subplots(rows, 2 * SHEET_COLUMNS, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for n, p in enumerate(picks):
        image, crop = axes[n // SHEET_COLUMNS, 2 * (n % SHEET_COLUMNS):2 * (n % SHEET_COLUMNS) + 2]
        im = decode_rgb(index.path(int(p["image"])))
        y, x, h, w = boxes_to_relative(p["box"]) * np.array([im.height, im.width, im.height, im.width])
        image.imshow(im)
        image.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="#ff2020", linewidth=1.5))
        label = labels[p["image"]]
        image.set_title(f"#{n + 1}" + ("" if label < 0 else f" label: {_short(classes[label])}"), fontsize=8)
        view = im.resize((res, res), Image.BILINEAR, box=(x, y, x + w, y + h))
        crop.imshow(ImageOps.mirror(view) if p["flip"] else view)
        crop.set_title("\n".join(f"{_short(classes[i])} {v:.2f}" for i, v in zip(p["ids"][:SHOWN_CLASSES], p["probs"])),
                       fontsize=7)
    fig.savefig(path, dpi=DPI)


def _short(name: str, most: int = 16) -> str:
    return name if len(name) <= most else name[:most - 1] + "…"
