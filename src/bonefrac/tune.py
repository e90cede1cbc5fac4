"""Hyperparameter search: an Optuna study around `train.fit`, one normal run directory per trial.

    tune(base_config, out_dir, n_trials=20) -> TuneResult, and in out_dir/:
        study.db              the Optuna study (SQLite; absent when --storage names another database)
        trials/trial-NNNN/    each trial's run directory, as `bonefrac train` writes it (a pruned trial's
                              stops after its last epoch: checkpoints and logs, no model.safetensors)
        best.yaml             the best trial's complete config: `bonefrac train DATA --config best.yaml`
        trials.csv, top_trials.md   every trial (number, state, val AUROC, seconds, parameters, run directory)
        history, importances, parallel (.html with plotly, .png with matplotlib)

Sampler and pruning. TPE proposes each trial from the finished ones. The objective is the run's best val AUROC
(summary.json), never a test number. A full-training trial reports its val AUROC after every epoch through
optuna-integration's Lightning pruning callback, and the median (or Hyperband) pruner stops a trial that trails
the others at the same epoch. A linear probe has no Lightning epochs (its head is fitted full-batch, probe.py),
so nothing prunes it; its trials are cheap instead, since the backbone features come from the feature cache.

Search spaces are data (SPACES), one per model family, chosen from the config (`search_family`). A trial's
parameters are config keys ("train.lr"), so its config is the base config with those keys set (`trial_config`),
and the best trial's config is written as a complete YAML.

Storage and scale-out. The study lives in Optuna's RDB storage: SQLite in the study folder by default; any
SQLAlchemy URL (PostgreSQL) lets workers on several machines share one study (docs/SCALING.md). The workers
coordinate through the storage alone:

- N counts the trials workers started, all workers together; a retry (below) is the same trial again, not a
  new one. A worker asks for a new trial only while fewer than N were started. Two workers may ask at the same
  moment: trial numbers are unique, so the later trial finds N trials below its number and goes back to the
  queue (WAITING) without running, instead of becoming trial N+1; its worker then asks for nothing more and waits
  for the running trials, so that its summary covers the whole study.
- A running trial writes a heartbeat (`heartbeat_interval`). A trial whose worker died (killed, machine lost)
  stops beating; after the grace period the next worker that looks marks it FAIL, and Optuna's
  RetryHeartbeatStaleTrialCallback queues it again with the same parameters (MAX_RETRIES times at most).
- Re-running the same command resumes the study (same name and storage) and runs only what is missing to reach
  N, queued retries first. A worker that finds N started but trials still running waits for them, so that the
  retry of a dead worker's trial is not left in the queue.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials

# The heartbeat thread that Study.optimize runs around each trial; this module asks and tells itself (see _work).
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import FrozenTrial, TrialState
from optuna_integration import PyTorchLightningPruningCallback

from bonefrac import DISCLAIMER
from bonefrac.choices import PRUNERS
from bonefrac.config import ConfigError, RunConfig, differences, from_yaml, to_yaml
from bonefrac.errors import DataLeakageError, DatasetError
from bonefrac.models import model_spec

log = logging.getLogger("bonefrac.tune")

MAX_RETRIES = 1  # a trial whose worker died runs once more; killed again, it stays FAIL
# Keys that may differ between workers of one study: where each machine keeps the data and caches.
MACHINE_KEYS = ("data.root", "data.cache_dir", "data.workers")
TOP = 10  # trials in top_trials.md and in the CLI's table
TRIAL_COLUMNS = ("number", "state", "val_auroc", "seconds", "retry_of", "params", "run_dir")  # trials.csv

SPACES: dict[str, dict[str, BaseDistribution]] = {
    # bonefrac's own CNNs, trained from scratch: the searches of Optuna's PyTorch Lightning example (learning
    # rate, dropout, batch size) plus weight decay. Channel widths are fixed by the model's CNNConfig.
    "cnn": {
        "train.lr": FloatDistribution(1e-4, 1e-2, log=True),
        "model.drop_rate": FloatDistribution(0.0, 0.5),
        "data.batch_size": CategoricalDistribution((16, 32, 64)),
        "train.weight_decay": FloatDistribution(1e-6, 1e-3, log=True),
    },
    # Pretrained backbones. unfreeze_blocks is the freeze depth: how many of the backbone's last blocks train
    # after the head-only epochs; it matters with freeze_epochs > 0 (--recipe adam-two-phase).
    "pretrained": {
        "train.lr": FloatDistribution(1e-5, 1e-3, log=True),
        "train.weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
        "train.unfreeze_blocks": IntDistribution(0, 4),
        "data.image_size": CategoricalDistribution((192, 224, 256)),
        "data.augment": CategoricalDistribution(("none", "seed", "strong")),
        "train.label_smoothing": FloatDistribution(0.0, 0.2),
    },
    # A head on frozen features. Its L2 penalty is already chosen on val loss inside each fit (probe.PENALTIES);
    # what is left is the loss (label smoothing, class weights), how long L-BFGS runs (train.epochs rounds) and
    # the image size, which changes the features: each new size costs one backbone pass, then it is cached.
    "linear-probe": {
        "train.label_smoothing": FloatDistribution(0.0, 0.2),
        "data.class_balance": CategoricalDistribution(("none", "weights")),
        "train.epochs": IntDistribution(5, 15),
        "data.image_size": CategoricalDistribution((192, 224, 256)),
    },
}


@dataclass
class StudyCounts:
    """Where a study stands, counted as N counts: a trial and its retries are one trial."""

    started: int  # trials a worker started (not retries; not waiting in the queue)
    done: int  # finished trials that no retry replaces
    running: int
    queued_retries: int

    @classmethod
    def of(cls, trials: list[FrozenTrial]) -> StudyCounts:
        replaced = {number for t in trials for number in _retry_history(t)}
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        return cls(
            started=sum(_is_original(t) and t.state != TrialState.WAITING for t in trials),
            done=sum(t.state.is_finished() and t.number not in replaced for t in trials),
            running=sum(t.state == TrialState.RUNNING for t in trials),
            queued_retries=sum(not _is_original(t) for t in waiting),
        )


@dataclass
class TuneResult:
    """What a worker leaves when the study has its N trials (or the timeout stopped it)."""

    study_name: str
    out_dir: Path
    family: str
    n_trials: int
    counts: StudyCounts
    states: dict[str, int]  # trials per state, retries included
    best_value: float | None  # best val AUROC of a COMPLETE trial
    best_number: int | None
    best_params: dict[str, Any]
    best_config: Path | None  # best.yaml
    top: list[dict[str, Any]]  # rows of trials.csv, best first
    files: list[Path] = field(default_factory=list)


def search_family(config: RunConfig) -> str:
    """The key of SPACES for this config: linear-probe, cnn (our nets, from scratch) or pretrained (timm)."""
    if config.train.strategy == "linear-probe":
        return "linear-probe"
    return "cnn" if model_spec(config.model.name).timm_name is None else "pretrained"


def trial_config(base: RunConfig, params: Mapping[str, Any]) -> RunConfig:
    """The base config with a trial's parameters (config keys) set, validated as a YAML file would be."""
    raw = asdict(base)
    for key, value in params.items():
        section, _, name = key.partition(".")
        raw[section][name] = value
    return from_yaml(yaml.safe_dump(raw, sort_keys=False), source="trial parameters")


def open_storage(url: str, *, heartbeat: int = 60) -> RDBStorage:
    """Optuna's RDB storage at `url` with heartbeats: a trial silent for 2 heartbeats is failed and retried."""
    try:
        try:
            return _rdb_storage(url, heartbeat)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError):
            # Workers started together on a new database all create Optuna's tables; the slower one may collide:
            # "table exists" (OperationalError) or a second row in alembic_version (IntegrityError, UNIQUE).
            time.sleep(2)
            return _rdb_storage(url, heartbeat)
    except Exception as err:  # SQLAlchemy: unknown dialect, driver not installed, server unreachable
        raise ConfigError(f"--storage {_without_password(url)}: cannot open it ({err})") from None


def _rdb_storage(url: str, heartbeat: int) -> RDBStorage:
    # SQLite lets one writer in at a time; wait for the other worker rather than fail after the default 5 s.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RDBStorage(
            url,
            engine_kwargs=engine,
            heartbeat_interval=heartbeat,
            grace_period=2 * heartbeat,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
        )


def make_pruner(name: str, *, epochs: int) -> optuna.pruners.BasePruner:
    """median: prune below the median of earlier trials at the same epoch; hyperband; none."""
    if name == "median":
        # The first epochs' AUROC is noisy: compare from the second epoch on, once 3 trials have finished.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner: {name!r} is not one of {', '.join(PRUNERS)}")


def tune(
    base: RunConfig,
    out_dir: str | Path,
    *,
    n_trials: int,
    storage: str | None = None,
    study_name: str | None = None,
    timeout: float | None = None,
    pruner: str | optuna.pruners.BasePruner = "median",
    seed: int | None = None,
    heartbeat: int = 60,
    report: Callable[[str], None] | None = None,
    verbose: bool = False,
) -> TuneResult:
    """Run trials of the study until it has `n_trials` (all workers together), then write the results.

    storage: SQLAlchemy URL (default sqlite:///<out_dir>/study.db); study_name: default the folder's name.
    timeout: start no new trial after this many seconds. seed: the sampler's (give each worker its own).
    report: called with one line per finished trial ("trial 3/20 ..., best so far ..."). verbose: Lightning's own
    banners and model summary in every trial.
    """
    if n_trials < 1:
        raise ConfigError(f"--trials: must be at least 1, got {n_trials}")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = _with_absolute_paths(base)
    family = search_family(base)
    if family == "pretrained" and base.train.freeze_epochs == 0:
        log.warning("freeze_epochs is 0: every block trains, so train.unfreeze_blocks changes nothing")
    rdb = open_storage(storage or f"sqlite:///{out / 'study.db'}", heartbeat=heartbeat)
    name = study_name or out.name
    study = optuna.create_study(
        study_name=name,
        storage=rdb,
        direction="maximize",
        # constant_liar: a running trial counts as a poor result, so parallel workers do not propose the same
        # point; 5 random trials before TPE models (Optuna's 10 is long for a CPU study).
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, constant_liar=True),
        pruner=make_pruner(pruner, epochs=base.train.epochs) if isinstance(pruner, str) else pruner,
        load_if_exists=True,
    )
    _check_base(study, base)
    scanned: list = []  # the data folder's (manifest, audit), made by the first trial this worker runs

    def objective(trial: optuna.Trial) -> float:
        if not scanned:
            from bonefrac.data.trainset import scan_and_audit  # torch: only when a trial runs

            scanned.extend(scan_and_audit(base, None, progress=False))
        return _run_trial(trial, base, SPACES[family], out, data=tuple(scanned), verbose=verbose)

    _work(study, rdb, objective, n_trials=n_trials, timeout=timeout, wait=heartbeat, report=report or log.info)
    return write_results(study, out, base, n_trials=n_trials, family=family)


def _run_trial(
    trial: optuna.Trial, base: RunConfig, space: Mapping[str, BaseDistribution], out: Path, *, data: tuple,
    verbose: bool = False,
) -> float:
    """Train one trial's config into trials/trial-NNNN; its best val AUROC (TrialPruned when pruned).

    data: the data folder's (manifest, audit), scanned and hashed once for every trial of this worker.
    """
    from bonefrac.run import Run
    from bonefrac.train import fit  # imports torch and Lightning: not needed to read a study's results

    params = {key: _suggest(trial, key, distribution) for key, distribution in space.items()}
    config = trial_config(base, params)
    run_dir = out / "trials" / f"trial-{trial.number:04d}"
    trial.set_user_attr("run_dir", str(run_dir))
    probe = config.train.strategy == "linear-probe"
    callbacks = [] if probe else [PyTorchLightningPruningCallback(trial, monitor="val_auroc")]
    manifest, audit = data
    fit(config, run_dir, progress=False, verbose=verbose, callbacks=callbacks, manifest=manifest, audit=audit)
    value = Run.load(run_dir).summary()["best_val_auroc"]
    if value is None or math.isnan(value):
        raise DatasetError(f"{run_dir}: val AUROC is not defined (val lacks a class)")
    return float(value)


def _suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, log=distribution.log)
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    raise TypeError(f"{name}: unsupported distribution {distribution!r}")


def _work(
    study: optuna.Study,
    storage: RDBStorage,
    objective: Callable[[optuna.Trial], float],
    *,
    n_trials: int,
    timeout: float | None,
    wait: float,
    report: Callable[[str], None],
) -> None:
    """Ask, run and tell trials until the study has n_trials (see the module docstring for how they count).

    Study.optimize would create trial N+1 when two workers ask at once; asking ourselves lets a surplus trial go
    back to the queue before it runs. Around each trial, the same heartbeat thread that optimize runs.
    """
    started = time.monotonic()
    gave_back = False  # this worker drew a surplus trial: it asks for no more, and waits for the running ones
    while timeout is None or time.monotonic() - started < timeout:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            fail_stale_trials(study)  # dead workers' trials: FAIL, and queued again (the retry callback)
        counts = StudyCounts.of(study.get_trials(deepcopy=False))
        if gave_back or (counts.started >= n_trials and not counts.queued_retries):
            if not counts.running:
                return
            time.sleep(wait)  # another worker's trial: it finishes, or goes stale and is retried here
            continue
        with warnings.catch_warnings():
            # "Heartbeat of storage is supposed to be used with Study.optimize": it is, below.
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask()
        trial_id = trial._trial_id  # Optuna keeps no public handle on a trial's storage id
        if _is_surplus(study, trial.number, n_trials):
            storage.set_trial_state_values(trial_id, TrialState.WAITING)  # back to the queue, never run
            gave_back = True
            continue
        value, state, error = None, TrialState.FAIL, None
        with get_heartbeat_thread(trial_id, storage):
            try:
                value, state = objective(trial), TrialState.COMPLETE
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except (DataLeakageError, DatasetError, KeyboardInterrupt) as err:  # every trial would stop so
                study.tell(trial, state=TrialState.FAIL)
                raise err from None
            except Exception as err:  # this trial's config fails (out of memory, a bad combination): go on
                error = err
                study.tell(trial, state=TrialState.FAIL)
                log.warning("trial %d failed: %s", trial.number, err)
        if error is None:
            study.tell(trial, value, state=state)
        report(_progress_line(study, trial.number, n_trials))


def _retry_history(trial: FrozenTrial) -> list[int]:
    """The numbers of the failed trials that this one retries, the first trial first; [] for an original."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # unchanged since Optuna 3.0, still flagged
        return RetryHeartbeatStaleTrialCallback.retry_history(trial)


def _is_original(trial: FrozenTrial) -> bool:
    return not _retry_history(trial)


def _is_surplus(study: optuna.Study, number: int, n_trials: int) -> bool:
    """A new trial with n_trials started trials below its number: another worker asked at the same moment."""
    trials = study.get_trials(deepcopy=False)
    mine = next(t for t in trials if t.number == number)
    return _is_original(mine) and sum(_is_original(t) and t.number < number for t in trials) >= n_trials


def _progress_line(study: optuna.Study, number: int, n_trials: int) -> str:
    """'trial 3/20 (#4) COMPLETE: val AUROC 0.9012; best so far 0.9050 (#2)'."""
    trials = study.get_trials(deepcopy=False)
    trial = next(t for t in trials if t.number == number)
    # A pruned trial's value is its last reported epoch's.
    label = "last val AUROC" if trial.state == TrialState.PRUNED else "val AUROC"
    value = f": {label} {trial.value:.4f}" if trial.value is not None else ""
    best = _best(trials)
    best_text = f"best so far {best.value:.4f} (#{best.number})" if best else "no trial completed yet"
    done = StudyCounts.of(trials).done
    return f"trial {done}/{n_trials} (#{number}) {trial.state.name}{value}; {best_text}"


def _best(trials: list[FrozenTrial]) -> FrozenTrial | None:
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    return max(complete, key=lambda t: t.value) if complete else None


# --- results -------------------------------------------------------------------------------------------------


def write_results(study: optuna.Study, out: Path, base: RunConfig, *, n_trials: int, family: str) -> TuneResult:
    """best.yaml, trials.csv, top_trials.md and the plots into `out`; what they say as a TuneResult."""
    trials = study.get_trials()
    ranked = sorted(trials, key=lambda t: (t.state != TrialState.COMPLETE, -(t.value or 0.0), t.number))
    rows = [_row(t) for t in ranked]
    files = [_write_csv(rows, out / "trials.csv"), _write_top_table(rows, out / "top_trials.md", study.study_name)]
    best = _best(trials)
    best_config = None
    if best is not None:
        best_config = out / "best.yaml"
        header = (
            f"# bonefrac tune: study {study.study_name}, trial {best.number}, val AUROC {best.value:.4f} "
            f"(val, never test).\n# Train it: bonefrac train DATA --config {best_config.name}\n# {DISCLAIMER}\n"
        )
        best_config.write_text(header + to_yaml(trial_config(base, best.params)))
        files.append(best_config)
        files += write_plots(study, out)
    states = {state.name: sum(t.state == state for t in trials) for state in TrialState if state != TrialState.WAITING}
    result = TuneResult(
        study_name=study.study_name,
        out_dir=out,
        family=family,
        n_trials=n_trials,
        counts=StudyCounts.of(trials),
        states={name: n for name, n in states.items() if n},
        best_value=best.value if best else None,
        best_number=best.number if best else None,
        best_params=dict(best.params) if best else {},
        best_config=best_config,
        top=rows[:TOP],
        files=files,
    )
    summary = {
        **{key: value for key, value in asdict(result).items() if key not in ("files", "top")},
        "disclaimer": DISCLAIMER,
    }
    (out / "study.json").write_text(json.dumps(summary, indent=2, default=str))
    return result


def _row(trial: FrozenTrial) -> dict[str, Any]:
    seconds = trial.duration.total_seconds() if trial.duration else None
    history = _retry_history(trial)
    return {
        "number": trial.number,
        "state": trial.state.name,
        "val_auroc": trial.value,
        "seconds": None if seconds is None else round(seconds, 1),
        "retry_of": history[0] if history else None,
        "params": dict(sorted(trial.params.items())),
        "run_dir": trial.user_attrs.get("run_dir", ""),
    }


def _write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=TRIAL_COLUMNS)
        writer.writeheader()
        writer.writerows({**row, "params": json.dumps(row["params"])} for row in rows)
    return path


def _write_top_table(rows: list[dict[str, Any]], path: Path, name: str) -> Path:
    lines = [
        f"# Top trials of study {name}",
        "",
        f"Objective: val AUROC (validation split; test data never used). {DISCLAIMER}",
        "",
        "| trial | state | val AUROC | seconds | parameters |",
        "|---|---|---|---|---|",
    ]
    for row in rows[:TOP]:
        auroc = "" if row["val_auroc"] is None else f"{row['val_auroc']:.4f}"
        params = format_params(row["params"])
        lines.append(f"| {row['number']} | {row['state']} | {auroc} | {row['seconds'] or ''} | {params} |")
    path.write_text("\n".join(lines) + "\n")
    return path


def format_params(params: Mapping[str, Any]) -> str:
    """'lr=0.00262 drop_rate=0.172 batch_size=16': short names, 3 significant digits."""
    return " ".join(
        f"{key.partition('.')[2]}={value:.3g}" if isinstance(value, float) else f"{key.partition('.')[2]}={value}"
        for key, value in params.items()
    )


def write_plots(study: optuna.Study, out: Path) -> list[Path]:
    """Optimization history, parameter importances and parallel coordinates, as HTML (plotly) and PNG.

    A plot Optuna cannot draw yet (importances need 2 complete trials) is skipped with a log line.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    from matplotlib import pyplot as plt
    from optuna import visualization
    from optuna.visualization import matplotlib as mpl_visualization

    written = []
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    for name in ("optimization_history", "param_importances", "parallel_coordinate"):
        if name == "param_importances" and complete < 2:  # Optuna would draw every parameter as equal
            log.info("no importances plot: it needs 2 complete trials, the study has %d", complete)
            continue
        stem = out / name.replace("optimization_", "").replace("param_", "").replace("_coordinate", "")
        # Optuna's matplotlib plots switch pyplot to its ggplot style: rc_context restores the caller's style.
        with warnings.catch_warnings(), matplotlib.rc_context():
            warnings.simplefilter("ignore", ExperimentalWarning)
            # A parameter with one value so far gives a flat axis; matplotlib says so, the plot is still right.
            warnings.filterwarnings("ignore", message="Attempting to set identical low and high")
            try:
                figure = getattr(visualization, f"plot_{name}")(study, target_name="val AUROC")
                axes = getattr(mpl_visualization, f"plot_{name}")(study, target_name="val AUROC")
            except (ValueError, RuntimeError) as err:
                log.info("no %s plot: %s", name, err)
                continue
            figure.update_layout(title=f"{figure.layout.title.text or name}<br><sup>{DISCLAIMER}</sup>")
            # plotly.js once, next to the pages: they open offline and the folder stays small.
            figure.write_html(stem.with_suffix(".html"), include_plotlyjs="directory")
            canvas = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            canvas.text(0.01, 1.0, DISCLAIMER, fontsize=6, alpha=0.7, va="bottom")  # above the title, clear of labels
            canvas.savefig(stem.with_suffix(".png"), dpi=100, bbox_inches="tight")
            plt.close(canvas)
        written += [stem.with_suffix(".html"), stem.with_suffix(".png")]
    return written


# --- the base config -----------------------------------------------------------------------------------------


def _with_absolute_paths(config: RunConfig) -> RunConfig:
    raw = asdict(config)
    raw["data"]["root"] = [str(Path(root).expanduser().resolve()) for root in config.data.roots]
    raw["data"]["cache_dir"] = str(Path(config.data.cache_dir).expanduser().resolve())
    return from_yaml(yaml.safe_dump(raw, sort_keys=False), source="base config")


def _check_base(study: optuna.Study, base: RunConfig) -> None:
    """Store the base config with a new study; refuse to add trials of another config to an existing one."""
    stored = study.user_attrs.get("base_config")
    if stored is None:
        study.set_user_attr("base_config", to_yaml(base))
        return
    changed = [d for d in differences(from_yaml(stored, source="the study's base config"), base)]
    refused = [(key, old, new) for key, old, new in changed if key not in MACHINE_KEYS]
    if refused:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in refused)
        raise ConfigError(
            f"study {study.study_name}: it was started with another config ({listed}); give the same options to "
            "resume it, or name a new study with --study"
        )


def _without_password(url: str) -> str:
    head, at, tail = url.rpartition("@")
    if not at or "://" not in head:
        return url
    scheme, _, credentials = head.partition("://")
    return f"{scheme}://{credentials.split(':')[0]}:***@{tail}"
