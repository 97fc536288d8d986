"""`mealv2 inspect`, `verify`, `publish` and `cache`: they import neither torch nor DALI unless
`verify --recompute` re-runs teachers."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..cli.params import NON_NEGATIVE, POSITIVE, LocalPath, StorePath, device_option, trust_option
from ..common.errors import MealV2Error
from ..common.store.cache import cached_stores, clear_cache, stores_root
from ..common.store.objects import check_url, is_url
from .publish import PublishConfig, published_lines, run_publish
from .report import run_lines, store_problems, store_summary, verify_store


@click.command()
@click.argument("store", type=StorePath(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--report", "report_dir", type=LocalPath(file_okay=False),
              help="Also write DIR/report.md and its PNG pictures: confidence and entropy per class, the mass the "
                   "stored top-k keep, the crops the teachers dispute most.")
@click.option("--data", type=LocalPath(exists=True),
              help="With --report: the dataset the store was labelled from, to draw the disputed crops.")
def inspect(store, as_json, report_dir, data):
    """Show what a label store holds: teachers, dataset, rounds, size, agreement with labels
    (on unlabelled data: the classes most often predicted top-1), the labelling runs and what each took."""
    if data and not report_dir:
        raise MealV2Error(f"inspect: --data {data} draws the crops of a report; add --report DIR")
    summary = store_summary(store)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        _report(store, report_dir, data, err=True)   # stdout holds the JSON alone
        return
    checks = {c["teacher"]: c for c in summary.pop("teacher_check") or []}
    for key, value in summary.items():
        if key == "teachers":
            click.echo("teachers:")
            for t in value:
                click.echo(f"  {_teacher_line(t, checks.get(t['spec']))}")
        elif key == "layers":
            if value:
                click.echo("per-teacher layers (their --teacher-weights positions):")
            for layer in value:
                teacher, check = layer["teacher"], layer["teacher_check"]
                check = checks.get(teacher["spec"]) if check is None else check   # a kept layer's: its teacher's
                state = "" if layer["finished"] else " [unfinished: re-run its `mealv2 label --add-teacher` command]"
                click.echo(f"  {layer['position']}. {layer['added_by']}{state}: {_teacher_line(teacher, check)}")
        elif key == "runs":
            click.echo("labelling runs:")
            for line in run_lines(value):
                click.echo(f"  {line}")
        elif key == "top1_histogram":   # set only for unlabelled data, in place of the agreement
            if value is not None:
                shares = ", ".join(f"{name} {100 * share:.1f}%" for name, share in value.items())
                click.echo(f"top1_histogram (no labels; round 0's crops by predicted top-1 class, most "
                           f"predicted first): {shares}")
        elif not (key == "top1_agreement" and summary["top1_histogram"] is not None):
            click.echo(f"{key}: {value}")
    _report(store, report_dir, data)


def _teacher_line(teacher: dict, check: dict | None) -> str:
    """A teacher as the store records it, with its teacher check's outcome."""
    check = check or {}
    why = f" ({check['why']})" if check.get("why") else ""
    agreement = (f"teacher check skipped{why}" if check.get("skipped") else
                 f"top-1 agrees with the labels on {100 * check['agreement']:.1f}% of {check['crops']} sampled crops"
                 if check else "not checked")
    return (f"{teacher['spec']}  ({teacher['arch']}, {teacher['res']} px, mean {teacher['mean']} std {teacher['std']}, "
            f"weight {teacher['weight']}, sha256 {teacher['sha256'][:12]}): {agreement}")


def _report(store, report_dir, data, err: bool = False) -> None:
    if report_dir:
        from .store_report import write_report   # matplotlib and torch: only for a report

        replacing = (Path(report_dir) / "report.md").is_file()
        files = write_report(store, report_dir, data=data)
        click.echo(f"wrote {Path(report_dir) / 'report.md'} and {len(files) - 1} pictures"
                   + (" in place of the report there and the files it linked" if replacing else ""), err=err)


@click.command()
@click.argument("store", type=StorePath(exists=True))
@click.option("--data", type=LocalPath(exists=True),
              help="Dataset the store was made from: check its images against the store (paths, classes, labels, "
                   "sizes, every image's CRC32C). Loads no teacher.")
@click.option("--recompute", type=POSITIVE, metavar="N",
              help="With --data: load the teachers the store names (its maker's checkpoint paths and timm models) "
                   "and re-label the stored crops of N random images of a random round. Only for a store whose "
                   "teachers you have and trust.")
@click.option("--tolerance", type=NON_NEGATIVE, default=0.02, show_default=True,
              help="With --recompute: largest allowed |stored - recomputed| probability.")
@device_option
@trust_option
def verify(store, data, recompute, tolerance, device):
    """Check checksums and shard completion; with --data, DATA's images against the store; with --recompute
    too, re-run the teachers on stored crops."""
    problems, fix = store_problems(store)
    if not problems and (data or recompute):
        problems = verify_store(store, data=data, recompute=recompute, tolerance=tolerance, device=device)
    if problems:
        for p in problems:
            click.echo(f"PROBLEM {p}", err=True)
        if fix:
            click.echo(fix, err=True)
        raise SystemExit(1)
    if data and recompute is None:
        click.echo(f"--data {data}: its images are those the store labelled (paths, classes, labels, sizes, bytes); "
                   f"teachers not re-run (--recompute N loads them)")
    click.echo(f"{store}: OK")


@click.group()
def cache():
    """Show or free the machine-local cache of stores read from URLs ($MEALV2_CACHE/stores)."""


@cache.command("ls")
def cache_ls():
    """List the cached stores: URL, objects, bytes, when last used, processes reading it now."""
    stores = cached_stores()
    click.echo(f"{stores_root()}: {len(stores)} store(s), {sum(s['bytes'] for s in stores) / 2**20:.1f} MiB")
    for s in stores:
        users = f", read by {s['users']} process(es) now" if s["users"] else ""
        click.echo(f"  {s['url']}: {s['objects']} objects, {s['bytes'] / 2**20:.1f} MiB, last used "
                   f"{s['last_used']}{users}  ({s['folder']})")


@cache.command("clear")
@click.argument("url", required=False)
def cache_clear(url):
    """Delete the cached objects of every store, or of store URL; a store a process is reading now
    is skipped, and said (its objects are downloaded again when next read)."""
    if url is not None and not is_url(url):
        raise MealV2Error(f"cache clear {url}: the cache holds stores read from URLs (s3://..., https://...); give "
                          f"a URL `mealv2 cache ls` lists, or none to clear them all")
    cleared, skipped = clear_cache(url and check_url(url))
    for s in cleared:
        click.echo(f"cleared {s['url']}: {s['objects']} objects, {s['bytes'] / 2**20:.1f} MiB")
    for s in skipped:
        click.echo(f"skipped {s['url']}: a process is reading it now ({s['folder']}); run again once it has "
                   f"finished", err=True)
    if not cleared and not skipped:
        click.echo(f"nothing cached{f' for {url}' if url else ''} in {stores_root()}")
    if skipped:
        raise SystemExit(1)


@click.command()
@click.argument("store", type=StorePath(exists=True))
@click.argument("dest", type=StorePath(write=True))
def publish(store, dest):
    """Copy finished STORE to DEST to share it: its teachers' checkpoint paths become their file names; the
    images' relative paths, class names and teacher names stay. DEST: a new or empty folder, or s3://."""
    for line in published_lines(run_publish(PublishConfig(store, dest)), store):
        click.echo(line)
