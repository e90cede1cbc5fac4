"""One self-contained HTML page describing a run: data, training, evaluation, calibration and a model card.

    write_report(run, data_root=None)   -> RUN/report.html

Everything the page shows is read through the run (run.Run: summary, audit, metrics.csv, learning curves,
calibration, eval/<split>/) plus a few thumbnails from the data folder. Every image is
embedded as a base64 PNG and there is no external CSS, script or font, so the file can be mailed or archived and
still open as it was written. The research-only disclaimer comes first, and the leakage, synthetic-data and strata
warnings come before the numbers they qualify.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bonefrac import DISCLAIMER, __version__
from bonefrac.atomic import write_atomic
from bonefrac.data.audit import leak_line
from bonefrac.data.dataset import SYNTHETIC_NOTICE, common_root, find_layout
from bonefrac.data.io import read_image, truncated_loaded
from bonefrac.detection import BELOW, box_levels_text, box_text, drawn_hit, read_box_cell
from bonefrac.errors import BonefracError, ImageReadError
from bonefrac.metrics import METRIC_NAMES, format_interval, format_number
from bonefrac.run import CONFIG_FILE, CURVES_FILE, REPORT_FILE, Run
from bonefrac.safe_text import restore_csv

SAMPLES_PER_CLASS = 4
THUMBNAIL_SIDE = 112
EVAL_PLOTS = (
    ("roc.png", "ROC curve with AUC and its 95% CI; the marker is the chosen threshold"),
    ("pr.png", "Precision-recall curve"),
    ("confusion_matrix.png", "Confusion matrix: counts, and shares of each true class"),
    ("reliability.png", "Reliability diagram: predicted probability against observed frequency"),
    ("score_histograms.png", "Score histograms per true class, with the threshold"),
)
SMALL_TEST_SET = 200  # fewer evaluated files than this: say the CIs are wide for a reason
STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#1a1a1a;"
    "line-height:1.45}table{border-collapse:collapse;margin:.5em 0 1em}caption{text-align:left;font-weight:600;"
    "padding:.3em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:left;vertical-align:top}"
    "th{background:#f0f0f0}.disclaimer{background:#fff3cd;border:2px solid #8a6d00;padding:.6em;font-weight:600}"
    ".bad{color:#a00018;font-weight:600}.ok{color:#1b5e20}.synthetic{background:#e3f2fd;border:2px solid #0d47a1;"
    "padding:.5em;font-weight:600}.grid{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0 0 1em}"
    ".grid figure{width:120px;font-size:11px;word-break:break-all}img{max-width:100%;height:auto}"
    "pre{background:#f6f6f6;padding:.6em;overflow-x:auto}nav ul{columns:2}"
    # A gallery image opens at full size on a click, with CSS alone (:target): the same embedded image is drawn
    # fixed over a dark backdrop, which is a link back to the gallery; no script, no second copy of the image.
    ".zoomable .open{cursor:zoom-in}.zoomable .close{display:none}"
    ".zoomable:target .open img{position:fixed;inset:0;margin:auto;width:96vw;height:92vh;max-width:none;"
    "object-fit:contain;z-index:2;pointer-events:none}"
    ".zoomable:target .close{display:block;position:fixed;inset:0;z-index:1;background:rgba(0,0,0,.85);color:#fff;"
    "font-size:20px;text-align:right;padding:.4em .8em;text-decoration:none;cursor:zoom-out}"
)

esc = html.escape


# --- small builders ---------------------------------------------------------------------------------------------


def png_data_uri(data: bytes) -> str:
    """bytes of a PNG -> 'data:image/png;base64,...' for an <img src>."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def jpeg_data_uri(data: bytes) -> str:
    """bytes of a JPEG -> 'data:image/jpeg;base64,...' for an <img src>."""
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def _image(path: Path, alt: str, caption: str | None = None) -> str:
    if not path.is_file():
        return f"<p>{esc(path.name)} not found in the run directory.</p>"
    figcaption = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f"<figure><img src='{png_data_uri(path.read_bytes())}' alt='{esc(alt)}'>{figcaption}</figure>"


def _zoomable(anchor: str, section: str, jpeg: bytes, alt: str, caption: str) -> str:
    """A gallery figure embedded once at full size, shown small, opened over the page on a click (STYLE's
    .zoomable) and closed back to its section."""
    return (f"<figure class='zoomable' id='{anchor}'><a class='open' href='#{anchor}' title='open at full size'>"
            f"<img src='{jpeg_data_uri(jpeg)}' alt='{esc(alt)}'></a><a class='close' href='#{section}'>close ×</a>"
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], caption: str | None = None) -> str:
    if not rows:
        return "<p>None.</p>"
    head = "".join(f"<th scope='col'>{esc(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(
            (f"<th scope='row'>{esc(str(c))}</th>" if i == 0 else f"<td>{esc(str(c))}</td>") for i, c in enumerate(row)
        ) + "</tr>"
        for row in rows
    )
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _interval(entry: dict | None) -> tuple[str, str]:
    """(point, '[low, high]') of a metrics.json entry, 'n/a' where undefined."""
    if not entry or entry.get("point") is None:
        return "n/a", "n/a"
    ci = "n/a" if entry.get("low") is None else f"[{entry['low']:.3f}, {entry['high']:.3f}]"
    return f"{entry['point']:.3f}", ci


def thumbnail_uri(path: Path, side: int = THUMBNAIL_SIDE) -> str | None:
    """A grayscale PNG thumbnail of any readable image as a data URI; None when the file cannot be read."""
    try:
        pixels, _ = read_image(path, max_side=2 * side)
    except ImageReadError:
        return None
    image = Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L")
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return png_data_uri(buffer.getvalue())


def sample_files(root: Path, per_class: int = SAMPLES_PER_CLASS) -> dict[str, list[Path]]:
    """A few files per class, spread evenly over the sorted files of the train split (else of any split)."""
    layout = find_layout(root)
    splits = [s for s, _, _ in layout]
    chosen_split = "train" if "train" in splits else splits[0]
    out: dict[str, list[Path]] = {}
    for split, label, folder in layout:
        if split != chosen_split:
            continue
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        picks = np.linspace(0, len(files) - 1, num=min(3 * per_class, len(files))).round().astype(int)
        out.setdefault(label, []).extend(files[i] for i in dict.fromkeys(picks.tolist()))
    return out


# --- sections -------------------------------------------------------------------------------------------------------


def _audit_section(audit: dict | None) -> str:
    parts = ["<h2 id='audit'>Data audit</h2>"]
    if audit is None:
        return parts[0] + "<p>No audit.json in the run directory: the data were not audited with this run.</p>"
    labels = audit["labels"]
    parts.append(f"<p>{audit['n_images']} readable images in <code>{esc(audit['root'])}</code>; "
                 f"{len(audit.get('problems', []))} unreadable or skipped; {len(audit.get('groups', []))} duplicate "
                 f"groups of two or more files; {len(audit.get('label_conflicts', []))} images under two labels.</p>")
    rows = [[split or "(no split)", *(c.get(label, 0) for label in labels), sum(c.values())]
            for split, c in audit["counts"].items()]
    parts.append("<h3 id='balance'>Counts and class balance</h3>")
    parts.append(_table(["split", *labels, "total"], rows, "Images per split and class"))
    for split, counts in audit["counts"].items():
        total = sum(counts.values()) or 1
        shares = ", ".join(f"{label} {counts.get(label, 0) / total:.0%}" for label in labels)
        parts.append(f"<p>{esc(split or 'all')}: {esc(shares)}</p>")
    parts.append("<h3>Leakage between splits</h3>")
    for entry in audit.get("leakage", []):
        line = leak_line(entry)
        parts.append(f"<p class='{'bad' if entry['files'] else 'ok'}'>{esc(line)}</p>")
    if not audit.get("leakage"):
        parts.append("<p>No splits: nothing to leak between.</p>")
    parts.append("<h3>Confounders (a trivial image property alone against the label)</h3>")
    parts.append(_table(
        ["feature", "AUC", "warning"],
        [[c["feature"], c["auc"], "predicts the label: the model may learn it" if c["warn"] else ""]
         for c in audit.get("confounders", [])],
        "An AUC far from 0.5 means the property alone separates the classes",
    ))
    return "".join(parts)


def _samples_section(folders: Sequence[Path], synthetic: bool) -> str:
    parts = ["<h2 id='samples'>Sample images per class</h2>"]
    if synthetic:
        parts.append("<p class='synthetic'>SYNTHETIC phantom images, not radiographs of people.</p>")
    for root in folders:
        parts.append(_folder_samples(root, synthetic, named=len(folders) > 1))
    return "".join(parts)


def _folder_samples(root: Path, synthetic: bool, *, named: bool) -> str:
    """A few thumbnails per class of one data folder; named: each class heading names the folder too."""
    if not root.is_dir():
        return f"<p>The data folder {esc(str(root))} is not here: no samples shown.</p>"
    try:
        samples = sample_files(root)
    except BonefracError as err:
        return f"<p>No samples: {esc(str(err))}</p>"
    parts = []
    for label, files in samples.items():
        cells = []
        for path in files:
            uri = thumbnail_uri(path)
            if uri is None:
                continue
            name = path.relative_to(root).as_posix()
            tag = "SYNTHETIC " if synthetic else ""
            cells.append(f"<figure><img src='{uri}' alt='{esc(f'{tag}{label} example: {name}')}'>"
                         f"<figcaption>{esc(name)}</figcaption></figure>")
            if len(cells) == SAMPLES_PER_CLASS:
                break
        heading = f"{root.name}: {label}" if named else label
        parts.append(f"<h3>{esc(heading)}</h3><div class='grid'>{''.join(cells) or '<p>no readable file</p>'}</div>")
    return "".join(parts)


def _training_section(run: Run, summary: dict | None) -> str:
    parts = ["<h2 id='training'>Training</h2>"]
    probe = (summary or {}).get("probe")
    if probe:
        return "".join(parts) + _probe_section(run, summary, probe)
    if run.members:
        return "".join(parts) + _ensemble_section(summary or {})
    if summary:
        auroc = summary.get("best_val_auroc")
        parts.append(
            f"<p>{esc(str(summary.get('model')))}, {summary.get('parameters', 0):,} parameters; "
            f"{summary.get('epochs_completed')} epochs ({'stopped early' if summary.get('stopped_early') else 'all'})"
            f"; best epoch {summary.get('best_epoch')} with val AUROC "
            f"{'n/a' if auroc is None else f'{auroc:.3f}'}; {summary.get('training_seconds', 0):.0f} s of training "
            f"on {esc(str(summary.get('device')))}.</p>"
        )
    history = run.history()
    parts.append(_image(run.path / CURVES_FILE, "Learning curves: loss, accuracy and val AUROC per epoch",
                        "Train and val loss, accuracy and val AUROC per epoch"))
    if history:
        columns = [c for c in ("epoch", "train_loss", "val_loss", "train_acc", "val_acc", "val_auroc",
                               "epoch_seconds") if c in history[0]]
        parts.append(_table(columns, [[row[c] for c in columns] for row in history], "Per-epoch metrics.csv"))
    return "".join(parts)


def _probe_section(run: Run, summary: dict, probe: dict) -> str:
    """A linear probe has no epochs to show: the features computed once, and the L2 penalties tried on val."""
    reused = "reused from the feature cache" if probe.get("features_reused") else "computed once"
    auroc = summary.get("best_val_auroc")
    text = (
        f"<p>{esc(str(summary.get('model')))} as a <strong>linear probe</strong>: the pretrained backbone's "
        f"{probe['feature_dim']} features per image {reused} ({probe['feature_seconds']:.0f} s), then only the "
        f"linear head ({summary.get('trainable_parameters', 0):,} of {summary.get('parameters', 0):,} parameters) "
        f"fitted full-batch with L-BFGS ({run.config.train.epochs} rounds) for each of "
        f"{len(probe['candidates'])} L2 penalties; the penalty with the lowest val loss, "
        f"{probe['penalty']:g}, was kept: val AUROC {'n/a' if auroc is None else f'{auroc:.3f}'}. "
        f"{summary.get('training_seconds', 0):.0f} s in all.</p>"
    )
    rows = [[f"{c['penalty']:g}", f"{c['val_loss']:.4f}", format_number(c["val_auroc"], 3), f"{c['val_acc']:.3f}",
             f"{c['train_loss']:.4f}", "chosen (lowest val loss)" if c["penalty"] == probe["penalty"] else ""]
            for c in probe["candidates"]]
    table = _table(["L2 penalty", "val loss", "val AUROC", "val accuracy", "train loss", ""], rows,
                   "The penalty sweep, on val (test never seen)")
    curves = _image(run.path / CURVES_FILE, "Loss and accuracy per L-BFGS round of the chosen penalty",
                    "The chosen penalty's fit, round by round (a converged fit repeats its last values)")
    return text + table + curves


def _ensemble_section(summary: dict) -> str:
    """An ensemble trains nothing: its members, each at its own input size and temperature, and their val AUROC."""
    auroc = summary.get("best_val_auroc")
    text = (
        f"<p>An <strong>ensemble</strong> of {len(summary.get('members', []))} runs (bonefrac ensemble): the mean "
        "of their logits, each divided by its own temperature, then one temperature and the thresholds fitted on "
        f"val. {summary.get('parameters', 0):,} parameters in all; val AUROC "
        f"{'n/a' if auroc is None else f'{auroc:.3f}'}.</p>"
    )
    rows = [[m["name"], m["model"], m["image_size"], f"{m['temperature']:.3f}", format_number(m.get("val_auroc"), 3)]
            for m in summary.get("members", [])]
    return text + _table(["member run", "model", "input px", "temperature", "val AUROC (its best epoch)"], rows,
                         "The members, as ensemble.json keeps them")


def _metrics_table(metrics: dict) -> str:
    rows = []
    for key, name in METRIC_NAMES:
        entry = metrics["metrics"].get(key)
        if entry is None:
            continue
        point, ci = _interval(entry)
        rows.append([name, point, ci, entry["n_files"], entry["n_groups"], "LEAKY" if entry["leaky"] else "no"])
    caption = (f"{metrics['split']}: metrics with 95% bootstrap CIs ({metrics['ci']}; groups from "
               f"{metrics['groups_from']})")
    return _table(["metric", "value", "95% CI", "n files", "n groups", "leaky"], rows, caption)


def _strata_table(column: str, table: dict) -> str:
    rows = []
    for value, entry in table.items():
        cells = [value, entry["n_files"], entry["n_groups"]]
        for key in ("roc_auc", "sensitivity", "specificity"):
            point, ci = _interval(entry.get(key))
            cells.append(f"{point} {ci}" if point != "n/a" else "n/a")
        rows.append(cells)
    return _table([column, "n files", "n groups", "AUC [95% CI]", "sensitivity [95% CI]", "specificity [95% CI]"],
                  rows, f"Per {column}")


def _evaluation_section(evals: dict[str, dict], run: Run) -> str:
    parts = ["<h2 id='evaluation'>Evaluation</h2>"]
    if not evals:
        return parts[0] + "<p>Not evaluated yet: run <code>bonefrac evaluate RUN --split test</code>.</p>"
    for split, metrics in evals.items():
        parts.append(f"<h3 id='eval-{esc(split)}'>{esc(split)} split: {metrics['n_files']} files in "
                     f"{metrics['n_groups']} groups</h3>")
        for line in metrics.get("leakage", []):
            parts.append(f"<p class='bad'>LEAKY: {esc(line)}. Every metric of this split measures memory, "
                         "not diagnosis.</p>")
        if metrics.get("synthetic_data"):
            parts.append("<p class='synthetic'>SYNTHETIC phantom data: these numbers say nothing about real "
                         "radiographs.</p>")
        if metrics.get("threshold") is not None:
            where = "chosen on val" if metrics.get("calibrated") else "default 0.5, not calibrated"
            parts.append(f"<p>Labels at threshold {metrics['threshold']:.4f} ({esc(metrics['operating_point'])}, "
                         f"{where}) on p({esc(metrics['positive_label'])}), temperature "
                         f"{metrics['temperature']:.3f}.</p>")
        parts.append(_metrics_table(metrics))
        if metrics.get("skipped_files"):
            parts.append(f"<p>{len(metrics['skipped_files'])} unreadable files were skipped.</p>")
        if metrics.get("truncated_files"):
            parts.append(f"<p>{esc(truncated_loaded(metrics['truncated_files']))}.</p>")
        for column, table in metrics.get("strata", {}).items():
            parts.append(f"<h4>Strata: {esc(column)}</h4>" + _strata_table(column, table))
        for warning in metrics.get("warnings", []):
            parts.append(f"<p class='bad'>WARNING {esc(warning)}</p>")
        for name, alt in EVAL_PLOTS:
            if (run.eval_dir(split) / name).is_file():
                parts.append(_image(run.eval_dir(split) / name, f"{alt} ({split} split)"))
    return "".join(parts)


def _calibration_section(run: Run, calibration: dict | None) -> str:
    parts = ["<h2 id='calibration'>Calibration and operating point</h2>"]
    if calibration is None:
        return parts[0] + ("<p>Not calibrated: probabilities are raw softmax outputs and the threshold is 0.5. "
                           "Run <code>bonefrac calibrate RUN</code>.</p>")
    parts.append(
        f"<p>Temperature T = {calibration['temperature']:.4f}, fitted on the <strong>val</strong> split "
        f"({calibration['n_files']} files, {calibration['n_groups']} groups); test data never influenced it. "
        f"NLL {calibration['nll']['before']:.4f} → {calibration['nll']['after']:.4f}; ECE "
        f"{calibration['ece']['before']:.4f} → {calibration['ece']['after']:.4f}.</p>"
    )
    points = run.operating_points()  # val figures, and test's with CIs where test was evaluated at the threshold
    on_test = any(point["test"] for point in points)
    rows = [[point["name"], f"{point['threshold']:.4f}", f"{point['val']['sensitivity']:.3f}",
             f"{point['val']['specificity']:.3f}",
             *([format_interval((point["test"] or {}).get(key)) if point["test"] else ""
                for key in ("sensitivity", "specificity")] if on_test else []),
             "operating point" if point["in_use"] else ""] for point in points]
    if rows:
        test_columns = ["test sensitivity [95 % CI]", "test specificity [95 % CI]"] if on_test else []
        parts.append(_table(["threshold rule", "threshold", "val sensitivity", "val specificity", *test_columns,
                             "used"], rows, f"Thresholds chosen on val for {calibration['positive_label']}"
                            + (", then applied once to test" if on_test else "")))
    else:
        parts.append("<p>More than two classes: the prediction is the class of highest calibrated probability.</p>")
    if "boxes" in calibration:  # a localiser's two box levels, chosen on the same val pass
        parts.append(f"<p>Box levels: {esc(box_levels_text(calibration['boxes']))}.</p>")
    return "".join(parts)


def _model_card(run: Run, summary: dict | None, audit: dict | None, evals: dict[str, dict],
                calibration: dict | None, folders: Sequence[Path], synthetic: bool) -> str:
    summary = summary or {}
    test = evals.get("test") or (next(iter(evals.values())) if evals else None)
    parts = ["<h2 id='model-card'>Model card</h2>", "<h3>Intended use</h3>",
             "<p>A research tool and, at most, a second-opinion aid for a clinician who reads the radiograph "
             "themselves, under supervision. <strong>Not a diagnosis</strong> and not a medical device: do not use "
             "it to decide the care of a patient.</p>", "<h3>Data</h3>"]
    counts = (audit or {}).get("counts") or summary.get("data") or {}
    count_text = "; ".join(f"{split or 'all'}: " + ", ".join(f"{k} {v}" for k, v in c.items())
                           for split, c in counts.items())
    groups = test.get("groups_from") if test else "unknown"
    # summary.json's account of each folder trained on (name, path, counts, manifest.csv md5), else the folders
    seen = [f"<code>{esc(d['path'])}</code> ({esc(d['name'])}; manifest.csv md5 {esc(str(d['manifest_md5']))})"
            for d in summary.get("datasets") or []] or [f"<code>{esc(str(folder))}</code>" for folder in folders]
    parts.append(
        f"<ul><li>source folder{'s' if len(seen) > 1 else ''}: {', '.join(seen)}</li>"
        f"<li>counts: {esc(count_text or 'unknown')}</li>"
        f"<li>groups for CIs: {esc(str(groups))}</li><li>{'SYNTHETIC phantom images' if synthetic else 'real images'}"
        f"</li><li>classes: {esc(', '.join(summary.get('labels', [])))}"
        + (f" (positive: {esc(summary['positive_label'])})" if summary.get("positive_label") else "")
        + "</li></ul>"
    )
    parts.append("<h3>Metrics</h3>")
    if test:
        m = test["metrics"]
        items = []
        for key, name in METRIC_NAMES[:4]:
            if key in m:
                point, ci = _interval(m[key])
                items.append(f"<li>{esc(name)}: {point}, 95% CI {ci} (n = {m[key]['n_files']} files, "
                             f"{m[key]['n_groups']} groups)</li>")
        parts.append(f"<p>On the {esc(test['split'])} split:</p><ul>{''.join(items)}</ul>")
    else:
        parts.append("<p>No evaluation yet.</p>")
    limits = []
    leaky_lines = [f"{s}: {line}" for s, e in evals.items() for line in e.get("leakage", [])]
    if summary.get("leaky") or leaky_lines:
        limits.append("LEAKY: splits share duplicate images, so numbers on them overstate: "
                      + "; ".join(leaky_lines + summary.get("leakage", [])))
    else:
        limits.append("No duplicate shared between the evaluated split and train was found by the audit.")
    for split, e in evals.items():
        limits += [f"{split} strata: {w}" for w in e.get("warnings", [])]
    if calibration is None:
        limits.append("Not calibrated: probabilities are raw softmax outputs and the threshold is 0.5.")
    else:
        limits.append(f"Calibration (T = {calibration['temperature']:.3f}) and the threshold were fitted on "
                      f"{calibration['n_files']} val files; on data from another scanner or hospital both may be off, "
                      "and the val sensitivity target is not guaranteed on new data.")
    if test and test["n_files"] < SMALL_TEST_SET:
        limits.append(f"Small evaluation set ({test['n_files']} files, {test['n_groups']} groups): wide CIs.")
    if synthetic:
        limits.append("Trained and evaluated on SYNTHETIC phantoms: says nothing about real radiographs.")
    limits.append("Confounders in the audit (image size, file size, source) can be learned instead of the fracture.")
    parts.append("<h3>Limitations</h3><ul>" + "".join(f"<li>{esc(x)}</li>" for x in limits) + "</ul>")
    config = (run.path / CONFIG_FILE).read_text()
    parts.append(
        "<h3>How to reproduce</h3><p><code>bonefrac train DATA --config RUN/config.yaml --out NEW_RUN</code>, then "
        "<code>bonefrac evaluate NEW_RUN --split test</code>. The config of this run "
        f"(bonefrac {esc(str(summary.get('bonefrac_version', __version__)))}):</p><pre>{esc(config)}</pre>"
    )
    if summary.get("probe"):
        from bonefrac.probe import UNUSED_KEYS

        parts.append(f"<p>A linear probe does not use {esc(', '.join(UNUSED_KEYS))}: the config file names every "
                     "key, but these did not shape this model.</p>")
    return "".join(parts)


GALLERY_PER_KIND = 3
GALLERY_FULL_SIDE = 1024  # the longest side of a gallery image when opened (the files are read no larger)


def gallery_picks(predictions_csv: Path, positive: str, per_kind: int = GALLERY_PER_KIND) -> list[tuple[str, dict]]:
    """(kind, predictions.csv row) for the gallery: the most confident true positives, the most confident false
    negatives (lowest p among fractured) and false positives (highest p among the rest)."""
    with open(predictions_csv, newline="") as handle:
        rows = [restore_csv(record) for record in csv.DictReader(handle)]
    column = f"p_{positive}"
    by_p = sorted(rows, key=lambda r: float(r[column]), reverse=True)
    found = [r for r in by_p if r["label"] == positive]
    picks = [("true positive", r) for r in found if r["prediction"] == positive][:per_kind]
    picks += [("false negative", r) for r in reversed(found) if r["prediction"] != positive][:per_kind]
    picks += [("false positive", r) for r in by_p if r["label"] != positive and r["prediction"] == positive][:per_kind]
    return picks


def _gradcam_section(run: Run, evals: dict[str, dict], root: Path) -> str:
    """Grad-CAM overlays (for the positive class) on the evaluated split's telling cases, drawn on the originals."""
    parts = [
        "<h2 id='gradcam'>Grad-CAM gallery</h2>",
        "<p>Where the model looked when scoring the positive class: Grad-CAM on the last conv stage, drawn on the "
        "original image (red = moved the score most). A heatmap shows what drove the score, not where a fracture "
        "is, and it is not a diagnosis. Made with <code>bonefrac explain</code>. Click an image to open it at full "
        "size.</p>",
    ]
    split = next((s for s in ("test", "val", *evals) if (run.eval_dir(s) / "predictions.csv").is_file()), None)
    if split is None:
        return "".join(parts) + "<p>No evaluated split yet: run <code>bonefrac evaluate</code> first.</p>"
    from bonefrac.explain import Explainer, overlay_rgb
    from bonefrac.predict import Predictor

    try:
        explainer = Explainer(Predictor(run, backend="torch"))
    except BonefracError as err:
        return "".join(parts) + f"<p>No gallery: {esc(str(err))}</p>"
    positive = explainer.predictor.labels[explainer.predictor.positive]
    cells: dict[str, list[str]] = {}
    for kind, row in gallery_picks(run.eval_dir(split) / "predictions.csv", positive):
        try:
            pixels, _ = read_image(root / row["file"], max_side=GALLERY_FULL_SIDE,
                                   allow_truncated=explainer.predictor.allow_truncated)
        except ImageReadError:
            continue
        heat = explainer.explain(pixels, target=positive).heatmap
        # Embedded once, at full size (JPEG: a PNG of a 1024-px overlay is ~1 MB); shown small, opened on a click.
        buffer = io.BytesIO()
        Image.fromarray(overlay_rgb(pixels, heat)).save(buffer, format="JPEG", quality=90)
        caption = f"{row['file']}: {row['label']}, p({positive}) {float(row[f'p_{positive}']):.2f}"
        anchor = f"gradcam-{sum(map(len, cells.values())) + 1}"
        cells.setdefault(kind, []).append(_zoomable(anchor, "gradcam", buffer.getvalue(),
                                                    f"Grad-CAM overlay, {kind}: {caption}", caption))
    if not cells:
        return "".join(parts) + f"<p>No readable {esc(split)} image under {esc(str(root))} to explain.</p>"
    for kind in ("true positive", "false negative", "false positive"):
        found = cells.get(kind)
        parts.append(f"<h3>{esc(kind)}s ({esc(split)})</h3>"
                     + (f"<div class='grid'>{''.join(found)}</div>" if found else f"<p>no {esc(kind)}s</p>"))
    return "".join(parts)


BOX_CASES = 3  # per kind in the boxes gallery: the first ones in file order, not the best
TRUTH_COLOUR = (0, 220, 0)


def _box_cases(rows: list[dict], truth_of: dict[str, list]) -> dict[str, list[dict]]:
    """The boxes gallery's picks among predictions.csv rows (with their boxes read back): fractured images a drawn
    box found (its centre in a radiologist's box), fractured images no drawn box found, and images without a
    fracture with a drawn box; BOX_CASES of each, in file order."""
    cases: dict[str, list[dict]] = {"found": [], "missed": [], "box on an image without a fracture": []}
    for row in rows:
        drawn = [b for b in row["boxes"] if b["level"] not in (None, BELOW)]
        truth = truth_of.get(row["file"])
        if truth:
            kind = "found" if drawn_hit(drawn, truth) else "missed"
        elif truth is not None and drawn:
            kind = "box on an image without a fracture"
        else:
            continue
        if len(cases[kind]) < BOX_CASES:
            cases[kind].append(row | {"truth": truth, "drawn": drawn})
    return cases


def _boxes_section(run: Run, evals: dict[str, dict], folders: Sequence[Path], root: Path) -> str:
    """A localiser's boxes on the evaluated split: the detection metrics, and cases with the radiologists' boxes
    (green) and the model's fracture (red) and doubt (orange) boxes, from predictions.csv."""
    from bonefrac.boxes import read_boxes
    from bonefrac.data.dataset import BOXES_FILE
    from bonefrac.explain import draw_boxes

    split = next((s for s in ("test", "val", *evals) if (evals.get(s) or {}).get("boxes")), None)
    parts = ["<h2 id='boxes'>Boxes</h2>"]
    if split is None:
        return "".join(parts) + ("<p>No evaluated split with boxes: the data folder needs a boxes.csv (split, "
                                 "label, file, x0, y0, x1, y1), then <code>bonefrac evaluate RUN</code>.</p>")
    record = evals[split]["boxes"]
    parts.append(f"<p>The localiser's boxes on the <strong>{esc(split)}</strong> split against the boxes of "
                 f"{BOXES_FILE} (95 % intervals resample groups). A box shows where the model's evidence is, not a "
                 "finding.</p><pre>" + esc("\n".join(box_text(record))) + "</pre>")
    truth_of: dict[str, list] = {}
    for folder in folders:
        if (folder / BOXES_FILE).is_file():
            for key, boxes in read_boxes(folder / BOXES_FILE).items():
                truth_of[(folder / key).relative_to(root).as_posix()] = boxes
    positive = run.positive_label
    with open(run.eval_dir(split) / "predictions.csv", newline="") as handle:
        rows = [restore_csv(r) for r in csv.DictReader(handle)]
    for row in rows:
        row["boxes"] = read_box_cell(row.get("boxes", ""))
        if row["label"] != positive:
            truth_of.setdefault(row["file"], [])
    for kind, picked in _box_cases(rows, truth_of).items():
        cells = []
        for row in picked:
            try:
                pixels, info = read_image(root / row["file"], max_side=GALLERY_FULL_SIDE)
            except ImageReadError:
                continue
            scale = pixels.shape[1] / info.width  # the boxes are in the file's pixels; the picture may be smaller
            rgb = np.repeat(np.rint(pixels * 255).astype(np.uint8)[..., None], 3, axis=2)
            image = Image.fromarray(rgb)
            pen = ImageDraw.Draw(image)
            for box in row["truth"] or []:
                pen.rectangle(tuple(v * scale for v in box), outline=TRUTH_COLOUR, width=max(2, image.width // 250))
            picture = draw_boxes(np.asarray(image), [(tuple(b[k] * scale for k in ("x0", "y0", "x1", "y1")),
                                                      b["score"], b["level"]) for b in row["drawn"]])
            buffer = io.BytesIO()
            Image.fromarray(picture).save(buffer, format="JPEG", quality=90)
            true, drawn = len(row["truth"] or []), len(row["drawn"])
            caption = (f"{row['file']}: {row['label']}, p({positive}) {float(row[f'p_{positive}']):.2f}; "
                       f"boxes: {true} true, {drawn} drawn")
            cells.append(_zoomable(f"box-case-{kind.split()[0]}-{len(cells) + 1}", "boxes", buffer.getvalue(),
                                   f"boxes, {kind}: {caption}", caption))
        parts.append(f"<h3>{esc(kind)} ({esc(split)}; green: radiologist, red: fracture, orange: doubt)</h3>"
                     + (f"<div class='grid'>{''.join(cells)}</div>" if cells else "<p>none</p>"))
    return "".join(parts)


# --- the page -------------------------------------------------------------------------------------------------------


def write_report(run: Run | str | Path, data_root: str | Path | Sequence[str | Path] | None = None) -> Path:
    """Write RUN/report.html (one self-contained file) and return its path.

    data_root: the data folder(s) the sample thumbnails and the Grad-CAM gallery come from; default the run's own
    (config.yaml).
    """
    run = Run.of(run)
    given = [data_root] if isinstance(data_root, str | Path) else list(data_root or [])
    folders = [Path(folder).expanduser().resolve() for folder in given or run.config.data.roots]
    root = common_root(folders)  # what the evaluation's file paths are relative to
    summary = run.summary()
    audit = run.audit()
    calibration = run.calibration.record if run.calibration.fitted else None
    evals = run.evaluations()
    synthetic = bool(any((folder / SYNTHETIC_NOTICE).exists() for folder in folders)
                     or (summary or {}).get("synthetic_data"))
    name = run.path.resolve().name
    localising = any(e.get("boxes") for e in evals.values()) or "boxes" in (calibration or {})
    nav = [("audit", "Data audit"), ("samples", "Sample images"), ("training", "Training"),
           ("evaluation", "Evaluation"), ("calibration", "Calibration"), ("gradcam", "Grad-CAM"),
           *([("boxes", "Boxes")] if localising else []), ("model-card", "Model card")]
    parts = [
        f"<header><h1>bonefrac report: {esc(name)}</h1>",
        f"<p class='disclaimer' role='note'>{esc(DISCLAIMER)} Research use only.</p>",
    ]
    if synthetic:
        parts.append("<p class='synthetic'>SYNTHETIC data: this run was trained on phantom images.</p>")
    leaks = [f"training data: {line}" for line in (summary or {}).get("leakage", [])]
    leaks += [f"eval/{split}: {line}" for split, e in evals.items() for line in e.get("leakage", [])]
    if leaks:
        parts.append("<p class='bad'>LEAKY: " + "; ".join(esc(line) for line in leaks)
                     + ". Numbers on an affected split overstate; see Data audit and Limitations.</p>")
    parts.append("<nav aria-label='Contents'><ul>" + "".join(f"<li><a href='#{a}'>{esc(t)}</a></li>" for a, t in nav)
                 + "</ul></nav></header><main>")
    parts += [
        _audit_section(audit),
        _samples_section(folders, synthetic),
        _training_section(run, summary),
        _evaluation_section(evals, run),
        _calibration_section(run, calibration),
        _gradcam_section(run, evals, root),
        _boxes_section(run, evals, folders, root) if localising else "",
        _model_card(run, summary, audit, evals, calibration, folders, synthetic),
        f"</main><footer><p>Written by bonefrac {esc(__version__)} from <code>{esc(str(run.path))}</code>. "
        f"{esc(DISCLAIMER)}</p></footer>",
    ]
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>bonefrac report: {esc(name)}</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )
    out = run.path / REPORT_FILE
    return write_atomic(out, page)
