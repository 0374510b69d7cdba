"""The Python API: quantize, sweep, export and restore, the calls the command lines wrap.

Every function raises `VlmAutoquantError` (core/errors.py) for anything it cannot do; its
`problems` are the `Problem(input, message, fix)` list the CLI prints, naming each input by its
CLI flag. Bad input is `UsageError`, a failed run `RunFailed`, a signal `Interrupted`.

Imports of the search, the sweep and the export are made inside the functions, after the inputs
are validated, so that a refusal stays as cheap as the CLI's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import tracking
from .core import artifacts, bytecode, heap, lean_imports, paths
from .core.artifacts import COMPARISON_FILE, MANIFEST_FILE, QUANT_STATE_FILE, locked_output_dir
from .core.errors import Problem, Problems, UsageError
from .core.interrupt import StopFlag, stop_on_signals
from .core.timing import Parts, Phases, since_process_start
from .plan.inputs import OVERRIDE_FLAGS, Inputs, RunOptions
from .plan.schemes import default_catalog, load_catalog
from .plan.validate import gather, require_dependencies
from .run import manifest
from .run.manifest import Manifest
from .search.replicas import prestart, start_for

log = logging.getLogger("vlm_autoquant")
DEFAULT_SCHEME = "fp8-balanced-10b"
DEFAULT_EXPERIMENT = tracking.DEFAULT_EXPERIMENT
_OPTION_FIELDS = tuple(
    f.name for f in dataclasses.fields(RunOptions) if f.name not in ("model_dir", "output_dir", "calib_file")
)
_EXPORT_OPTIONS = (
    "overwrite",
    "lm_only",
    "allow_other_weights",
    "log_checkpoint",
    "register",
    "experiment",
    "mlflow",
    "format",
)


@dataclass(frozen=True)
class Result:
    """One finished scheme: where its files are, what its manifest says, and its MLflow run
    and experiment (None where it was not logged)."""

    output_dir: Path
    manifest: Manifest
    run_id: str | None = None
    experiment: str | None = None


@dataclass(frozen=True)
class ExportResult:
    """A verified checkpoint: where it is, its export report (export_report.json), and the
    export's MLflow run and experiment (None where it was not logged)."""

    output_dir: Path
    report: dict
    run_id: str | None = None
    experiment: str | None = None


@dataclass(frozen=True)
class SweepResult:
    """A finished sweep: its output dir, the comparison table, each scheme's manifest, and the
    sweep's MLflow parent run and experiment (None where it was not logged)."""

    output_dir: Path
    comparison: Path
    manifests: dict[str, Manifest]
    run_id: str | None = None
    experiment: str | None = None


def logged_run(out_dir: Path) -> tuple[str | None, str | None]:
    """(run id, experiment name) of the MLflow run that wrote `out_dir`; (None, None) if none."""
    recorded = tracking.recorded_run(out_dir)
    run_id = recorded[0] if recorded else None
    return run_id, None if run_id is None else tracking.experiment_of(run_id)


def split_options(
    model_dir: Path, output_dir: Path, calib_file: Path | None, kwargs: dict[str, Any]
) -> tuple[RunOptions, dict]:
    """RunOptions from the keyword arguments that name one of its fields; the rest are scheme
    overrides (None: the scheme's value). An unknown name is a UsageError listing the known."""
    unknown = sorted(set(kwargs) - set(_OPTION_FIELDS) - set(OVERRIDE_FLAGS))
    if unknown:
        raise UsageError(
            [
                Problem(
                    k,
                    "is neither a run option nor a scheme field",
                    f"use one of: {', '.join((*_OPTION_FIELDS, *OVERRIDE_FLAGS))}",
                )
                for k in unknown
            ]
        )
    opts = {k: v for k, v in kwargs.items() if k in _OPTION_FIELDS and v is not None}
    options = RunOptions(
        model_dir=Path(model_dir),
        output_dir=Path(output_dir),
        calib_file=None if calib_file is None else Path(calib_file),
        **opts,
    )
    return options, {f: kwargs.get(f) for f in OVERRIDE_FLAGS}


@contextlib.contextmanager
def _discarded_if_empty(output_dir: Path) -> Iterator[None]:
    """On failure, remove `output_dir` if this call made it and it holds only our bookkeeping."""
    existed = paths.exists(output_dir)
    try:
        yield
    except BaseException:
        if (
            not existed
            and paths.exists(output_dir)
            and artifacts.only_our_bookkeeping(output_dir, tracking.ended_here(output_dir))
        ):
            shutil.rmtree(output_dir, ignore_errors=True)
        raise


@contextlib.contextmanager
def _validated(
    options: RunOptions, names: list[str], overrides: dict, single: bool
) -> Iterator[tuple[Inputs, list]]:
    """Validate every input, take the output dir's lock, then plan the searches (tokenizes; no
    weights; may promote or discard search checkpoints, hence under the lock). All problems are
    reported together; the lock is held until the block ends."""
    problems = Problems()
    marker = MANIFEST_FILE if single else COMPARISON_FILE
    inputs = gather(options, names, overrides, problems, OVERRIDE_FLAGS, finished_marker=marker)
    problems.raise_if_any()
    from .plan.families import plan  # torch and transformers: only once the inputs are valid

    with locked_output_dir(options.output_dir, marker, options.overwrite):
        families = plan(inputs, problems, single)
        problems.raise_if_any()
        yield inputs, families


def run_scheme(options: RunOptions, scheme: str, overrides: dict) -> Result:
    """`quantize` on RunOptions: validate, plan, search, solve, evaluate, save and log."""
    require_dependencies()
    lean_imports.install()
    phases = Phases()
    phases.add("startup", since_process_start())
    with _discarded_if_empty(options.output_dir), contextlib.ExitStack() as stack:
        settle = stack.enter_context(heap.long_lived_heap())  # no collection rescans the imports
        # With several --gpus, the other GPUs' processes import while this one validates.
        pool = stack.enter_context(prestart(options.gpus, options.parallel))
        parts = Parts()
        with parts.collecting(), phases("validate", parts.note):
            inputs, families = stack.enter_context(_validated(options, [scheme], overrides, True))
        settle()  # before any replica is forked
        bytecode.warn_if_compiled_from_source(log)
        # They load their replica while this process imports ModelOpt and loads its own.
        replicas = stack.enter_context(start_for(inputs, families[0].placement, pool))
        with phases("import", "ModelOpt and the search's modules"):
            from .run.pipeline import run_single  # ModelOpt: only once the inputs are valid
        settle()  # and ModelOpt's modules
        with stop_on_signals(StopFlag()) as stop:
            doc = run_single(inputs, families[0], stop, options.experiment, phases, replicas)
            stop.raise_if_set()  # a signal after the search: the results are kept
    return Result(options.output_dir, doc, *logged_run(options.output_dir))


def quantize(
    model_dir: str | Path,
    scheme: str = DEFAULT_SCHEME,
    *,
    output_dir: str | Path | None = None,
    calib_file: str | Path | None = None,
    **overrides: Any,
) -> Result:
    """AutoQuantize the LM of the Qwen2.5-VL checkpoint `model_dir` with one catalog scheme.

    Args:
        output_dir: where the manifest and state are written (default outputs/<scheme>).
        calib_file: captions, one per line (default datasets/vlm-quantize-calib/...).
        overrides: scheme fields (effective_bits=9, batch_size=8, ...) and run options
            (overwrite, save_weights, grad_checkpointing, fp8_kernel, experiment, gpus,
            max_gpu_memory, parallel, catalog), by the CLI flags' names with underscores.

    Raises:
        VlmAutoquantError: with the problems the CLI would print.
    """
    out = Path(output_dir) if output_dir is not None else Path("outputs") / scheme
    options, scheme_overrides = split_options(Path(model_dir), out, calib_file, overrides)
    return run_scheme(options, scheme, scheme_overrides)


def run_schemes(options: RunOptions, schemes: list[str] | None, overrides: dict) -> SweepResult:
    """`sweep` on RunOptions: every scheme, one search per family, one MLflow parent run."""
    require_dependencies()
    lean_imports.install()
    names = schemes
    if names is None:
        try:
            names = list(load_catalog(options.catalog or default_catalog()))
        except UsageError:
            names = []  # gather reports the catalog's problems
    with (
        _discarded_if_empty(options.output_dir),
        heap.long_lived_heap() as settle,  # no collection rescans the imports
        prestart(options.gpus, options.parallel) as pool,
    ):
        from .run.sweep import run_sweep  # ModelOpt: imported while the replicas start

        with _validated(options, names, overrides, single=False) as (inputs, families):
            settle()  # before any replica is forked
            with (
                start_for(inputs, families[0].placement, pool) as replicas,
                stop_on_signals(StopFlag()) as stop,
            ):
                bytecode.warn_if_compiled_from_source(log)
                run_sweep(inputs, families, stop, options.experiment, replicas)
                stop.raise_if_set()  # a signal after the last scheme: the results are kept
    return _sweep_result(options.output_dir)


def _sweep_result(out: Path) -> SweepResult:
    fix = "rerun the sweep"
    manifests = [manifest.read(p, "output_dir", fix) for p in sorted(out.glob(f"*/{MANIFEST_FILE}"))]
    return SweepResult(out, out / COMPARISON_FILE, {m.scheme.name: m for m in manifests}, *logged_run(out))


def sweep(
    model_dir: str | Path,
    schemes: list[str] | None = None,
    *,
    output_dir: str | Path | None = None,
    calib_file: str | Path | None = None,
    **overrides: Any,
) -> SweepResult:
    """Run several catalog schemes (default: all of them) on one model, each family of schemes
    searched once; overrides as for `quantize`, applied to every scheme.

    Raises:
        VlmAutoquantError: with the problems the CLI would print; a scheme that fails is a
            FAILED row of the comparison and a RunFailed at the end naming it.
    """
    out = Path(output_dir) if output_dir is not None else Path("outputs/sweep")
    options, scheme_overrides = split_options(Path(model_dir), out, calib_file, overrides)
    return run_schemes(options, schemes, scheme_overrides)


def _export_source(source: str | Path | None) -> tuple[Path | None, str | None]:
    """(the run's output dir, None) for a Path or an existing directory, else (None, run id)."""
    folder = (
        Path(source) if isinstance(source, Path) or (source is not None and Path(source).is_dir()) else None
    )
    return folder, None if folder is not None or source is None else str(source)


def export_output_dir(source: str | Path | None, output_dir: str | Path | None) -> Path:
    """Where `export` writes: `output_dir`, else exports/<run id> or exports/<name of the run's
    output dir>."""
    if output_dir is not None:
        return Path(output_dir)
    folder, run_id = _export_source(source)
    return Path("exports") / (run_id or (folder.name if folder is not None else "x"))


def _export_options(
    source: str | Path | None,
    model_dir: str | Path | None,
    output_dir: str | Path | None,
    options: dict[str, Any],
):
    from .exporter.inputs import FORMATS, ExportOptions  # safetensors: only for an export

    unknown = sorted(set(options) - set(_EXPORT_OPTIONS))
    if unknown:
        raise UsageError(
            [
                Problem(k, "is not an export option", f"use one of: {', '.join(_EXPORT_OPTIONS)}")
                for k in unknown
            ]
        )
    if options.get("format") not in (None, *FORMATS):
        raise UsageError(
            Problem(
                "format",
                f"{options['format']!r} is not an export format",
                f"use one of: {', '.join(FORMATS)}",
            )
        )
    folder, run_id = _export_source(source)
    out = export_output_dir(source, output_dir)
    kept = {k: v for k, v in options.items() if k != "mlflow" and v is not None}
    return ExportOptions(
        output_dir=out,
        run_id=run_id,
        artifacts_dir=folder,
        model_dir=None if model_dir is None else Path(model_dir),
        **kept,
    )


def export(
    source: str | Path | None,
    *,
    model_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    **options: Any,
) -> ExportResult:
    """Turn a finished run (an MLflow run id, or a run's output dir as a Path or an existing
    directory) into a verified Qwen2.5-VL checkpoint.

    Args:
        model_dir: the base checkpoint (default: the one the run recorded).
        output_dir: default exports/<run id> or exports/<name of the run's dir>.
        options: overwrite, lm_only, allow_other_weights, log_checkpoint, register, experiment,
            format ("compressed-tensors" (default), "modelopt" or "both"), mlflow (False: do
            not log the export).

    Raises:
        VlmAutoquantError: with the problems the CLI would print.
    """
    opts = _export_options(source, model_dir, output_dir, options)
    lean_imports.install()
    from .exporter.inputs import checked  # safetensors: only for an export

    if not options.get("mlflow", True):
        _refuse_server_without_mlflow(opts.run_id)
    tracker_factory = _export_tracker_factory(opts.experiment) if options.get("mlflow", True) else None
    with (
        _discarded_if_empty(opts.output_dir),
        heap.long_lived_heap() as settle,  # no collection rescans the imports
        stop_on_signals(StopFlag()) as stop,
        checked(opts) as (inputs, phases),
    ):
        from .exporter.pipeline import export_gathered  # ModelOpt and torch: once the inputs are valid

        settle()
        report = export_gathered(inputs, phases, tracker_factory, stop)
    run_id = (report.get("mlflow") or {}).get("run_id")
    return ExportResult(
        opts.output_dir, report, run_id, None if run_id is None else tracking.experiment_of(run_id)
    )


def _export_tracker_factory(experiment: str | None) -> Callable[[str, Path], tracking.Tracker]:
    """`(name, output dir) -> Tracker` for the export's own MLflow run, recorded in the output
    dir; refuses an unreachable tracking server first."""
    problems = Problems()
    tracking.check_reachable(problems, experiment)
    problems.raise_if_any()

    def tracker_factory(name: str, out_dir: Path) -> tracking.Tracker:
        tracking.close_stale(out_dir)  # a killed export's run, left RUNNING, is closed first
        return tracking.Tracker(experiment, name, out_dir=out_dir, draws=False)

    return tracker_factory


def _refuse_server_without_mlflow(run_id: str | None) -> None:
    """--no-mlflow never contacts a server: a --run-id there cannot be read without one."""
    if run_id and tracking.is_server(tracking.tracking_uri()):
        raise UsageError(
            Problem(
                "--run-id",
                f"with --no-mlflow the run's artifacts cannot be "
                f"read: they are on the tracking server {tracking.shown_uri()}, "
                "which --no-mlflow never contacts",
                "pass --artifacts-dir (the "
                "run's --output-dir, or its downloaded artifacts) instead of "
                "--run-id, or drop --no-mlflow",
            )
        )


def restore(
    run_dir: str | Path,
    model_dir: str | Path | None = None,
    device: str | None = None,
    allow_other_weights: bool = False,
):
    """The quantized LM of a finished run (its output dir), on `device` (default: the GPU if
    any): the same logits as the run's model. `model_dir` defaults to the one the run recorded.

    Raises:
        VlmAutoquantError: the run's files are missing or not its own, or the weights differ.
    """
    lean_imports.install()
    from .model import quant_state  # ModelOpt: only for a restore

    run_dir = Path(run_dir)
    doc = manifest.read(run_dir / MANIFEST_FILE, "run_dir", "pass the --output-dir of a finished run")
    base = Path(model_dir) if model_dir is not None else Path(doc.model.directory)
    import torch  # only for a restore

    return quant_state.restore(
        base,
        run_dir / QUANT_STATE_FILE,
        torch.device(device) if device else None,
        allow_other_weights=allow_other_weights,
        manifest=doc,
    )
