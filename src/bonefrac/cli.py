"""The `bonefrac` command. Thin on purpose: parse arguments, call one library function, print the result."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from bonefrac import DISCLAIMER, __version__
from bonefrac.errors import BonefracError

console = Console()
errors = Console(stderr=True)


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar as a `progress(done, total)` callback, the form every library function takes."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=errors, transient=False) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def default_out(root: str, what: str) -> Path:
    return Path("out") / what / Path(root).resolve().name


# ------------------------------------------------------------------------------------------- commands


def cmd_data_scan(args: argparse.Namespace) -> int:
    from bonefrac.data.dataset import scan_folder, write_manifest

    with progress_bar("scanning") as progress:
        manifest = scan_folder(args.root, progress=progress)
    out = Path(args.out or default_out(args.root, "scan"))
    path = write_manifest(manifest, out)
    console.print(
        f"{len(manifest.rows)} images, labels {manifest.labels}, {len(manifest.problems)} skipped files"
    )
    console.print(f"manifest: {path}")
    return 0


def cmd_data_audit(args: argparse.Namespace) -> int:
    from bonefrac.data.audit import audit_manifest, console_tables, write_html, write_json
    from bonefrac.data.dataset import scan_folder, write_manifest

    with progress_bar("scanning") as progress:
        manifest = scan_folder(args.root, progress=progress)
    with progress_bar("decoding and hashing") as progress:
        report = audit_manifest(manifest, workers=args.workers, max_bits=args.max_bits, progress=progress)
    for renderable in console_tables(report):
        console.print(renderable)
    out = Path(args.out or default_out(args.root, "audit"))
    write_manifest(manifest, out)
    console.print(f"\nwritten: {write_json(report, out)}, {write_html(report, out)}, {out / 'manifest.csv'}")
    return 3 if (args.fail_on_leakage and report.leaky) else 0


def cmd_data_split(args: argparse.Namespace) -> int:
    from bonefrac.data.split import split_folder

    with progress_bar("auditing before the split") as progress:
        split_csv, report, rows = split_folder(
            args.root,
            args.out,
            fractions=args.fractions,
            seed=args.seed,
            group_csv=args.groups,
            csv_only=args.csv_only,
            workers=args.workers,
            progress=progress,
        )
    from rich.table import Table

    table = Table(title="Group-aware split")
    for header in ("split", *report.labels, "groups"):
        table.add_column(header, justify="left" if header == "split" else "right")
    for split in ("train", "val", "test"):
        mine = [r for r in rows if r["split"] == split]
        table.add_row(
            split,
            *(str(sum(r["label"] == lab for r in mine)) for lab in report.labels),
            str(len({r["group"] for r in mine})),
        )
    console.print(table)
    if report.problems:
        console.print(f"{len(report.problems)} unreadable or non-image files were left out (see the audit)")
    console.print(f"written: {split_csv}" + ("" if args.csv_only else f" and links under {args.out}"))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from bonefrac.data.synth import generate_dataset

    with progress_bar(f"rendering {args.n} phantoms") as progress:
        out = generate_dataset(
            args.out,
            n=args.n,
            size=args.size,
            labels=args.labels,
            seed=args.seed,
            workers=args.workers,
            progress=progress,
        )
    console.print(f"{args.n} SYNTHETIC phantom radiographs ({args.labels} labels, {args.size} px) in {out}")
    return 0


# --------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bonefrac",
        description=f"Bone radiograph fracture classification, honest about how well it does. {DISCLAIMER}",
    )
    parser.add_argument("--version", action="version", version=f"bonefrac {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    data = commands.add_parser(
        "data",
        help="inspect and prepare image folders: scan, audit, split, synth",
        description="Inspect and prepare image folders.",
    )
    data_commands = data.add_subparsers(title="data commands", metavar="COMMAND", required=True)

    scan = data_commands.add_parser(
        "scan", help="list a folder's images into manifest.csv (labels, splits, md5)"
    )
    scan.add_argument("root", help="root/<class>/ or root/{train,val,test}/<class>/")
    scan.add_argument(
        "--out", help="folder for manifest.csv, labels.json, problems.csv (default out/scan/<root>)"
    )
    scan.set_defaults(func=cmd_data_scan)

    audit = data_commands.add_parser(
        "audit", help="find unreadable files, duplicates, cross-split leakage, label conflicts, confounders"
    )
    audit.add_argument("root", help="root/<class>/ or root/{train,val,test}/<class>/")
    audit.add_argument(
        "--out", help="folder for audit.json, audit.html, manifest.csv (default out/audit/<root>)"
    )
    audit.add_argument("--workers", type=int, help="decoding processes (default: all cores)")
    audit.add_argument(
        "--max-bits", type=int, default=None, help="near-duplicate threshold in pHash bits of 256"
    )
    audit.add_argument(
        "--fail-on-leakage", action="store_true", help="exit with code 3 when splits share duplicates"
    )
    audit.set_defaults(func=cmd_data_audit)

    split = data_commands.add_parser("split", help="group-aware, class-stratified train/val/test split")
    split.add_argument("root", help="folder to split (any existing split is ignored)")
    split.add_argument("out", help="new folder: out/{train,val,test}/<class>/ as hard links, plus split.csv")
    split.add_argument(
        "--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST")
    )
    split.add_argument("--seed", type=int, default=0)
    split.add_argument(
        "--groups", help="CSV with a group column (and path or file) to keep patients together"
    )
    split.add_argument("--csv-only", action="store_true", help="write only split.csv, no links")
    split.add_argument("--workers", type=int, help="decoding processes for the audit (default: all cores)")
    split.set_defaults(func=cmd_data_split)

    synth = data_commands.add_parser(
        "synth", help="generate SYNTHETIC phantom radiographs (the demo data set)"
    )
    synth.add_argument("out", help="new folder: out/{train,val,test}/<class>/*.png")
    synth.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    synth.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    synth.add_argument(
        "--labels",
        choices=("binary", "types"),
        default="binary",
        help="fractured/not_fractured, or not_fractured + 5 fracture types",
    )
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=int, help="processes (default: all cores)")
    synth.set_defaults(func=cmd_data_synth)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except BonefracError as err:
        errors.print(f"[red]error:[/red] {err}", highlight=False)
        code = 2
    except KeyboardInterrupt:
        errors.print("interrupted")
        code = 130
    errors.print(f"[dim]{DISCLAIMER}[/dim]", highlight=False)
    return code


if __name__ == "__main__":
    sys.exit(main())
