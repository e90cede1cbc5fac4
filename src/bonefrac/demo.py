"""`bonefrac demo`: the whole job in one call, from an image folder to calibrated, compared models with reports.

    run_demo(data=None, out="demo")  phantoms (or DATA) -> audit -> train two models (each calibrated on val)
                                     -> evaluate val and test -> report.html per run -> comparison -> summary

It calls the functions behind the commands (data.synth, data.audit, train.fit, evaluate, report, compare) in the
order a careful user runs them, so what the demo shows is the real pipeline, not a shortcut. Two models are
trained because "one model beats another" is a claim that needs a paired test on the same files: EfficientNet-Lite0
with its offline ImageNet weights as a linear probe (backbone features computed once, the head fitted on them), and
the same network fine-tuned (the head one epoch, then its last blocks with it).

The default sizes aim at `make demo` ending within 10 minutes on a 2-core CPU, install included, with models that
learn the phantom fractures (test AUC CIs that exclude 0.5; docs/PERFORMANCE.md, "make demo from a fresh clone").
Our small CNNs from scratch did not learn these phantoms in a demo's minutes (4 epochs of cnn-bn at 128 px stayed at
chance, measured there), so the second model is a fine-tuned one; fine-tuning only the last blocks at 128 px keeps
it to a few minutes.

Without `data` the images are SYNTHETIC phantoms (docs/SYNTHETIC_DATA.md) and every output says so. A user's
folder must already hold train/val/test; it is audited first, and leakage between splits stops the demo unless
`allow_leakage`, as it stops `bonefrac train`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bonefrac import DISCLAIMER, __version__
from bonefrac.calibration import YOUDEN
from bonefrac.compare import compare_runs, pair_sentences
from bonefrac.config import build_config
from bonefrac.console import console as default_console
from bonefrac.console import progress as step_progress
from bonefrac.data.audit import AuditReport, audit_manifest, console_tables, write_html, write_json
from bonefrac.data.dataset import SPLITS, SYNTHETIC_NOTICE, Manifest, scan_folder, write_manifest
from bonefrac.data.synth import generate_dataset
from bonefrac.errors import BonefracError, DataLeakageError, DatasetError
from bonefrac.evaluate import evaluate_run
from bonefrac.metrics import format_interval
from bonefrac.report import write_report
from bonefrac.train import fit

# The real demo's sizes (measured in docs/PERFORMANCE.md); tests pass tiny ones.
N_PHANTOMS = 800
PHANTOM_SIZE = 256  # px; hairline fractures are 1-2 px wide at this size
PHANTOM_SPLIT = (0.7, 0.15, 0.15)  # 120 test images: CIs narrow enough to tell a learned model from chance
IMAGE_SIZE = 128  # px, the models' input
FINETUNE_EPOCHS = 3  # the head alone, then FINETUNE_BLOCKS of the backbone with it
FINETUNE_BLOCKS = 3
HEADLINE = (("roc_auc", "ROC AUC"), ("sensitivity", "sensitivity"), ("specificity", "specificity"))
DEMO_FILE = "demo.json"  # in `out`: what the demo wrote and measured
SAMPLES = "samples"  # in `out`: the shipped model's predictions and one Grad-CAM overlay on the sample radiographs
OUTPUTS = ("phantoms", "audit", "runs", "compare", SAMPLES)  # the demo's folders in `out`, removed before a new demo
CACHE = "cache"  # decoded images and backbone features in `out`, kept from one demo to the next


@dataclass(frozen=True)
class DemoModel:
    """One model the demo trains: its run directory's name and the config keys it sets on top of the shared ones."""

    run_name: str
    description: str
    overrides: dict[str, Any]


def demo_models(finetune_epochs: int) -> tuple[DemoModel, ...]:
    """The two models the demo trains and compares: the pretrained features as they are (a linear probe), and the
    same network fine-tuned. Does fine-tuning beat the probe? The paired test on the same test files says."""
    return (
        DemoModel(
            "efficientnet_lite0",
            "EfficientNet-Lite0, offline ImageNet weights, linear probe",
            {"model.name": "efficientnet_lite0", "model.pretrained": True, "train.strategy": "linear-probe"},
        ),
        DemoModel(
            "lite0-finetuned",
            f"EfficientNet-Lite0 fine-tuned: the head 1 epoch, then with its last {FINETUNE_BLOCKS} blocks "
            f"{max(finetune_epochs - 1, 0)} more",
            {
                "model.name": "efficientnet_lite0",
                "model.pretrained": True,
                "train.recipe": "adam-two-phase",
                "train.epochs": finetune_epochs,
                "train.freeze_epochs": 1,
                "train.unfreeze_blocks": FINETUNE_BLOCKS,
                "train.lr": 1e-3,
                "train.phase2_lr": 3e-4,
                "data.augment": "none",
                "data.batch_size": 16,
            },
        ),
    )


@dataclass
class DemoRun:
    """One trained model: where its run and report are, and its test metrics (metrics.json entries with CIs)."""

    name: str
    description: str
    run_dir: Path
    report: Path
    metrics: dict[str, dict]  # roc_auc, sensitivity, specificity: point, low, high, n_files, n_groups, leaky
    youden: dict[str, dict]  # sensitivity and specificity at the val-chosen Youden threshold (metrics.json)
    threshold: float | None
    operating_point: str


@dataclass
class DemoResult:
    """What the demo wrote and measured; demo.json holds the same."""

    data_root: Path
    synthetic: bool
    audit: Path
    runs: list[DemoRun]
    compare: Path
    pairs: list[str]  # one sentence per pair of runs: the paired AUC difference with its CI and p-value
    seconds: dict[str, float]  # per stage, and "total"


def run_demo(
    data: str | Path | None = None,
    out: str | Path = "demo",
    *,
    n_phantoms: int = N_PHANTOMS,
    phantom_size: int = PHANTOM_SIZE,
    image_size: int = IMAGE_SIZE,
    finetune_epochs: int = FINETUNE_EPOCHS,
    allow_leakage: bool = False,
    seed: int = 0,
    shipped_on_samples: bool = True,
    console: Console | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> DemoResult:
    """Run the whole pipeline into `out` and print a summary; returns what was written.

    data: root/{train,val,test}/<class>/; None: generate `n_phantoms` SYNTHETIC phantoms into out/phantoms.
    out: a new or empty folder, or one an earlier demo wrote (its folders are replaced; out/cache is kept).
    shipped_on_samples: end with the shipped model on the sample radiographs that ship with bonefrac (24 FracAtlas
    test images): its prediction table and one Grad-CAM overlay, in out/samples.
    progress: progress bars and training lines on the terminal (stage lines and the summary always print).
    verbose: also Lightning's own banners and model summaries.
    Raises DatasetError (no train/val/test in `data`), DataLeakageError (splits share duplicates and not
    allow_leakage), and whatever a step raises.
    """
    console = console or default_console
    out = Path(out).expanduser().resolve()
    _prepare_out(out)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    console.print(f"[bold]bonefrac {__version__} demo[/bold] into {out}. {DISCLAIMER}")

    if data is None:
        with _stage(console, "phantoms", seconds):
            root = out / "phantoms"
            with step_progress(f"rendering {n_phantoms} phantoms", progress) as update:
                generate_dataset(root, n=n_phantoms, size=phantom_size, seed=seed, split=PHANTOM_SPLIT,
                                 progress=update)
            console.print(
                f"[bold yellow]SYNTHETIC DATA:[/bold yellow] {n_phantoms} phantom radiographs ({phantom_size} px) "
                f"in {root}. They are computed from a model of a limb, not X-rays of anyone: every number below "
                "is about phantoms and says nothing about real radiographs.",
            )
    else:
        root = Path(data).expanduser().resolve()
    synthetic = (root / SYNTHETIC_NOTICE).exists()

    with _stage(console, "audit", seconds):
        # The one scan and audit of the folder: training, evaluation and the comparison reuse them.
        manifest, audit = _audit(root, out / "audit", console, allow_leakage=allow_leakage, progress=progress)

    shared = {
        "data.root": str(root),
        "data.image_size": image_size,
        "data.workers": 0,  # on 2 cores worker processes compete with the compute threads (docs/PERFORMANCE.md)
        "data.cache_dir": str(out / CACHE),
        "train.seed": seed,
        "train.allow_leakage": allow_leakage or None,
    }
    runs = [
        _train_and_evaluate(model, shared, out, manifest, audit, console, seconds, progress=progress, verbose=verbose)
        for model in demo_models(finetune_epochs)
    ]

    with _stage(console, "compare", seconds):
        comparison = compare_runs([run.run_dir for run in runs], root, "test", out / "compare", manifest=manifest)
    if shipped_on_samples:
        with _stage(console, "shipped model on real radiographs", seconds):
            _shipped_on_samples(out / SAMPLES, console, progress=progress)
    seconds["total"] = round(time.perf_counter() - started, 1)
    result = DemoResult(root, synthetic, out / "audit", runs, out / "compare", pair_sentences(comparison), seconds)
    (out / DEMO_FILE).write_text(json.dumps(_to_json(result), indent=2))
    for renderable in summary(result):
        console.print(renderable, highlight=False)
    return result


def _train_and_evaluate(
    model: DemoModel, shared: dict[str, Any], out: Path, manifest: Manifest, audit: AuditReport, console: Console,
    seconds: dict[str, float], *, progress: bool, verbose: bool,
) -> DemoRun:
    """Train one model (calibrated on val), evaluate it on val and test, and write its report: two timed stages."""
    run_dir = out / "runs" / model.run_name
    with _stage(console, f"train {model.run_name}", seconds):
        console.print(f"{model.description}; temperature and threshold then fitted on val", highlight=False)
        fit(build_config(overrides=shared | model.overrides), run_dir, progress=progress, verbose=verbose,
            manifest=manifest, audit=audit)
    with _stage(console, f"evaluate {model.run_name}", seconds):
        console.print("val and test metrics with 95 % CIs, plots, report.html", highlight=False)
        with step_progress(f"{model.run_name}: val images", progress) as update:
            evaluate_run(run_dir, split="val", manifest=manifest, progress=update)
        with step_progress(f"{model.run_name}: test images", progress) as update:
            metrics = evaluate_run(run_dir, split="test", manifest=manifest, progress=update).metrics
        page = write_report(run_dir, manifest.root)
    return DemoRun(
        name=model.run_name,
        description=model.description,
        run_dir=run_dir,
        report=page,
        metrics={key: metrics["metrics"][key] for key, _ in HEADLINE if key in metrics["metrics"]},
        youden=(metrics.get("operating_points") or {}).get(YOUDEN, {}),
        threshold=metrics["threshold"],
        operating_point=metrics["operating_point"],
    )


def _shipped_on_samples(out: Path, console: Console, *, progress: bool) -> None:
    """The shipped model on the packaged real radiographs: the prediction table, predictions.csv, how many of each
    class it called fractured, for a localising model how many boxed fractures a drawn box found, and a Grad-CAM
    overlay (with the boxes) of the first fractured sample."""
    from bonefrac.boxes import read_boxes
    from bonefrac.data.dataset import BOXES_FILE
    from bonefrac.detection import drawn_hit
    from bonefrac.explain import Explainer, explain_paths
    from bonefrac.predict import Predictor, prediction_table, write_predictions
    from bonefrac.shipped import ATTRIBUTION_FILE, samples_dir, shipped_run

    folder, run = samples_dir(), shipped_run()
    console.print(f"the model that ships with bonefrac ({run.name}) on {folder}: real radiographs (FracAtlas test, "
                  f"CC BY 4.0, {ATTRIBUTION_FILE}) it never saw", highlight=False)
    predictor = Predictor(run, backend="torch")
    with step_progress("predicting the samples", progress) as update:
        result = predictor.predict_paths([folder], progress=update)
    console.print(prediction_table(result, predictor.operating_point, predictor.run.positive_label), highlight=False)
    written = write_predictions(result, out / "predictions.csv", "csv")
    positive = predictor.run.positive_label
    for label in predictor.run.labels:  # the truth is the sample's folder
        rows = [row for row in result.rows if Path(row.file).parent.name == label and row.status == "ok"]
        called = sum(row.prediction == positive for row in rows)
        console.print(f"  {label}: {called} of {len(rows)} called {positive}", highlight=False)
    if result.boxes and (folder / BOXES_FILE).is_file():  # a localising model: its drawn boxes against the truth
        truth = read_boxes(folder / BOXES_FILE)
        found = sum(drawn_hit(row.boxes, truth.get(Path(row.file).relative_to(folder).as_posix(), []))
                    for row in result.rows if row.status == "ok")
        console.print(f"  boxes: a fracture or doubt box on a radiologist's box in {found} of {len(truth)} boxed "
                      f"{positive} samples", highlight=False)
    first = sorted(folder.glob(f"{positive}/*.jpg"))[:1]
    explained = explain_paths(Explainer(predictor), first, out) if first else []
    console.print(f"predictions: {written}; Grad-CAM overlay: {explained[0].overlay if explained else 'none'}",
                  highlight=False)


def summary(result: DemoResult) -> list:
    """The closing lines: a table of test metrics with 95 % CIs per model, the paired tests, and where to look."""
    test_n = result.runs[0].metrics["roc_auc"]["n_files"] if result.runs else 0
    title = f"test split, {test_n} images" + (" (SYNTHETIC phantoms)" if result.synthetic else "") + ", 95% CIs"
    # One column per model, so that the table fits an 80-column terminal.
    table = Table(title=title, caption="sensitivity and specificity at thresholds chosen on val: the one in use "
                  "(for screening) and Youden's J")
    table.add_column("")
    for run in result.runs:
        table.add_column(run.name)
    for key, name in HEADLINE:
        table.add_row(name, *(format_interval(run.metrics.get(key)) for run in result.runs))
    table.add_row("threshold", *("argmax" if run.threshold is None else f"{run.threshold:.3f} ({run.operating_point})"
                                 for run in result.runs))
    if any(run.youden for run in result.runs):  # a balanced point beside the screening one
        for key in ("sensitivity", "specificity"):
            table.add_row(f"{key} at {YOUDEN}", *(format_interval(run.youden.get(key)) for run in result.runs))
    lines: list = [table, *result.pairs]
    if any(entry.get("leaky") for run in result.runs for entry in run.metrics.values()):
        lines.append("[bold red]LEAKY: test shares duplicates with train; these numbers overstate[/bold red]")
    lines.append(f"audit:      {result.audit / 'audit.html'}")
    lines += [f"report:     {run.report}" for run in result.runs]
    lines.append(f"comparison: {result.compare / 'compare.md'} (and compare.json, auc.png, operating_point.png)")
    if result.synthetic:
        lines.append("[bold yellow]SYNTHETIC DATA[/bold yellow]: phantoms, not radiographs; not evidence about real "
                     "X-rays. Run `bonefrac demo --data DIR` on your own train/val/test folder.")
    lines.append(f"{result.seconds['total']:.0f} s in all.")  # the CLI ends every command with the disclaimer
    return lines


# --- steps ----------------------------------------------------------------------------------------------------------


def _prepare_out(out: Path) -> None:
    """Refuse a folder holding anything a demo does not write; clear an earlier demo's folders (the cache stays)."""
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in (*OUTPUTS, CACHE, DEMO_FILE))
        if foreign:
            raise BonefracError(f"{out}: holds {', '.join(foreign[:3])}, which no demo wrote; choose a new or empty "
                                "folder with --out")
        for name in OUTPUTS:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _audit(
    root: Path, out: Path, console: Console, *, allow_leakage: bool, progress: bool
) -> tuple[Manifest, AuditReport]:
    """Scan and audit `root` into out/ (audit.json, audit.html, manifest.csv); print the audit's tables; return
    the scan and the audit.

    Raises DatasetError when a split is missing, DataLeakageError when splits share duplicates (unless allowed).
    """
    with step_progress("scanning", progress) as update:
        manifest = scan_folder(root, progress=update)
    found = {row.split for row in manifest.rows}
    if not set(SPLITS) <= found:
        listed = ", ".join(sorted(s for s in found if s)) or "no split folders"
        raise DatasetError(
            f"{root}: the demo needs train/, val/ and test/ folders (root/<split>/<class>/), found {listed}. Make a "
            f"group-aware split first: bonefrac data split {root} NEW_FOLDER, then bonefrac demo --data NEW_FOLDER"
        )
    with step_progress("decoding and hashing", progress) as update:
        report = audit_manifest(manifest, progress=update)
    write_manifest(manifest, out)
    write_json(report, out)
    page = write_html(report, out)
    for renderable in console_tables(report):
        console.print(renderable)
    leaks = [line for entry, line in zip(report.leakage, report.leakage_lines(), strict=True) if entry["files"]]
    if leaks and not allow_leakage:
        raise DataLeakageError(
            f"{root}: the splits share duplicate images, so the test numbers would measure memory, not diagnosis: "
            f"{'; '.join(leaks)} (details: {page}). Re-split group-aware with `bonefrac data split {root} "
            "NEW_FOLDER`, or run the demo anyway with --allow-leakage (every metric is then marked leaky)."
        )
    return manifest, report


@contextmanager
def _stage(console: Console, title: str, seconds: dict[str, float]) -> Iterator[None]:
    """A rule naming the stage before it, its time after it (also kept in `seconds`)."""
    console.rule(f"[bold]{title}[/bold]", align="left")
    started = time.perf_counter()
    yield
    seconds[title] = round(time.perf_counter() - started, 1)
    console.print(f"[dim]{title}: {seconds[title]:.1f} s[/dim]", highlight=False)


def _to_json(result: DemoResult) -> dict:
    """demo.json: the result with paths as strings, the disclaimer and the version."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, Sequence) and not isinstance(value, str):
            return [plain(item) for item in value]
        return value

    return {"bonefrac_version": __version__, "disclaimer": DISCLAIMER, **plain(asdict(result))}
