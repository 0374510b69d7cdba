"""The report stage: one scheme's result, read back from its output dir, logged to MLflow.

It reads only the manifest and the files beside it, so a run that could not log (tracking down)
is logged later, unchanged, with `--log-only --output-dir DIR`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import stat
import sys
from pathlib import Path

from ..core import paths
from ..core.artifacts import MANIFEST_FILE, SENSITIVITY_FIGURE
from ..core.errors import Problem, Problems, UsageError
from ..plan.schemes import Scheme
from ..tracking import (
    FORMAT_PREFIX,
    M_BITS_ACHIEVED,
    M_BITS_ALL,
    M_BITS_TARGET,
    M_CALIB_TOKENS,
    M_COMPRESSION,
    M_KL,
    M_LAYERS_BF16,
    M_LAYERS_FP8,
    M_PADDING,
    M_PEAK_GPU,
    M_PEAK_RSS,
    M_PPL_QUANT,
    M_PPL_REF,
    M_PPL_REL,
    M_PREDICTED_LOSS,
    M_TOP1,
    M_WEIGHT_BYTES,
    M_WEIGHT_BYTES_BF16,
    SENSITIVITY_PREFIX,
    TIME_PREFIX,
    Tracker,
    TrackingFailed,
    shown_uri,
)
from .manifest import BF16, FP8, LayerRecord, Manifest

log = logging.getLogger("vlm_autoquant")


def _param(value) -> str:
    """Params as a user reads them in the UI: lists comma-joined, an empty one as "none"."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return str(value)


def scheme_params(scheme: Scheme) -> dict[str, str]:
    """`scheme.<field>` params: effective values (the cost exclusions a null stands for), None
    values left out."""
    fields = {k: v for k, v in scheme.model_dump().items() if k not in ("description", "overrides")}
    if fields.get("cost_excluded_layers") is None:
        fields["cost_excluded_layers"] = scheme.disabled_layers or []
    return {f"scheme.{k}": _param(v) for k, v in fields.items() if v is not None}


def metrics_of(doc: Manifest) -> dict[str, float]:
    """The run's scalar metrics, all read from its manifest."""
    summ, bits, cal, q = doc.summary, doc.effective_bits, doc.calibration, doc.quality
    out = {
        M_BITS_ACHIEVED: bits.achieved,
        M_BITS_TARGET: bits.target,
        M_BITS_ALL: bits.all_linears,
        M_LAYERS_FP8: summ.fp8,
        M_LAYERS_BF16: summ.bf16,
        M_WEIGHT_BYTES: summ.weight_bytes,
        M_WEIGHT_BYTES_BF16: summ.weight_bytes_bf16,
        M_COMPRESSION: summ.compression_ratio,
        M_PADDING: cal.padding_fraction,
        M_CALIB_TOKENS: cal.tokens,
        M_PREDICTED_LOSS: doc.search.predicted_loss,
        M_PEAK_GPU: doc.memory.peak_gpu_gib,
        M_PEAK_RSS: doc.memory.peak_rss_gib,
    }
    if q:
        out.update(
            {
                M_KL: q.kl_mean,
                M_PPL_REF: q.ppl_ref,
                M_PPL_QUANT: q.ppl_quant,
                M_PPL_REL: q.ppl_rel_change,
                M_TOP1: q.top1_agreement,
            }
        )
    out.update({f"{TIME_PREFIX}{k}_s": v for k, v in doc.timings.items() if k not in ("run", "process")})
    out[f"{TIME_PREFIX}total_s"] = doc.timings.get("run")
    return out


def _inside(out_dir: Path, name: object) -> Path | None:
    """`out_dir / name` when `name` is a plain relative path that stays inside `out_dir`
    (symlinks followed), else None."""
    if not isinstance(name, str) or not name or "\x00" in name or os.path.isabs(name):
        return None
    path = out_dir / name
    root = os.path.realpath(out_dir)
    return path if os.path.realpath(path).startswith(root + os.sep) else None


def _copy_checked(src: Path, dst: Path) -> str:
    """Copy `src` to `dst` in one read, hashing the bytes copied; their sha256."""
    h = hashlib.sha256()
    fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(
                Problem(
                    "--output-dir",
                    f"{src} is not a regular file",
                    "restore the run's output dir as it was written",
                )
            )
        with os.fdopen(fd, "rb", closefd=False) as f, open(dst, "wb") as out:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def checked_artifacts(doc: Manifest, manifest_bytes: bytes, out_dir: Path, dst: Path) -> dict[str, Path]:
    """{name: copy in `dst`} of a finished run's artifacts, for --log-only: what is logged is
    what was checked. Every name must be a relative path inside `out_dir`, and every file is
    read once, into its copy, and its sha256 compared with the manifest's record; a file the
    manifest records no sha256 for is not logged. The manifest is logged as the bytes read."""
    names, digests = doc.artifacts, doc.artifacts_sha256
    problems, files = Problems(), {}
    for name in names.values():
        path = _inside(out_dir, name)
        if path is None:
            problems.add(
                "--output-dir",
                f"{MANIFEST_FILE} names the artifact {name!r}, which is "
                f"not a relative path inside {out_dir}; nothing was logged",
                "restore the manifest the run wrote",
            )
            continue
        if name == MANIFEST_FILE:
            (dst / name).write_bytes(manifest_bytes)
            files[name] = dst / name
        elif name not in digests:
            log.warning("%s records no sha256 of %s: not logged", MANIFEST_FILE, name)
        elif paths.exists(path):
            copy = dst / f"{len(files)}" / Path(name).name
            copy.parent.mkdir()
            if _copy_checked(path, copy) != digests[name]:
                problems.add(
                    "--output-dir",
                    f"{path} does not match the manifest's sha256: it "
                    "changed after the run wrote it; nothing was logged",
                    "restore the file, or rerun the quantization",
                )
            files[name] = copy
    problems.raise_if_any()
    return files


def log_scheme(tracker: Tracker, doc: Manifest, out_dir: Path, files: dict[str, Path] | None = None) -> None:
    """Params, tags, metrics, per-layer series, table, figure and artifacts of one scheme.

    `files`: the artifacts to log ({name: path}, from `checked_artifacts`); by default the
    files the manifest names in `out_dir`, as this run wrote them."""
    try:
        _log(tracker, doc, out_dir, files)
    except Exception as exc:  # noqa: BLE001 - any tracking failure means the same to the user
        raise not_logged(exc, out_dir, tracker.experiment) from exc


def not_logged(exc: BaseException, out_dir: Path, experiment: str | None) -> TrackingFailed:
    """The failure of a run whose result is on disk but not in MLflow, with the command that
    logs it later."""
    return TrackingFailed(
        f"logging to MLflow failed ({type(exc).__name__}: {exc}). The result is complete "
        f"and safe on disk in {out_dir} ({MANIFEST_FILE} and the files beside it). Once "
        f"tracking works again, log it with: {log_only_command(out_dir, experiment)}"
    )


def log_finished(
    tracker: Tracker,
    doc: Manifest,
    out_dir: Path,
    calib: list[str],
    held_out: list[str] | None,
    calib_path: Path,
) -> None:
    """A finished scheme's report (`log_scheme`) and its caption splits as MLflow datasets."""
    log_scheme(tracker, doc, out_dir)
    tracker.log_captions(calib, calib_path, "calibration", "training")
    if held_out:
        tracker.log_captions(held_out, calib_path, "held-out", "evaluation")


def log_only_command(out_dir: Path, experiment: str | None) -> str:
    """The command that logs `out_dir` later into the same store and experiment (the tracking
    URI shown with its credentials redacted; no --experiment where MLFLOW_EXPERIMENT_ID chose)."""
    words = [
        Path(sys.argv[0]).name,
        "--log-only",
        "--output-dir",
        str(out_dir),
        *(["--experiment", experiment] if experiment else []),
    ]
    env = f"MLFLOW_TRACKING_URI={shlex.quote(shown_uri())} " if os.environ.get("MLFLOW_TRACKING_URI") else ""
    return env + " ".join(shlex.quote(w) for w in words)


def _log(tracker: Tracker, doc: Manifest, out_dir: Path, files: dict[str, Path] | None) -> None:
    scheme = doc.scheme
    tracker.log_params(
        scheme_params(scheme)
        | {
            "scheme.overrides": ",".join(sorted(scheme.overrides)) or "none",
            "model_dir": doc.model.directory,
            "calib_file": doc.calibration.file,
        }
    )
    tracker.set_tags(
        {
            "scheme": scheme.name,
            "model.config_sha256": doc.model.config_sha256,
            "data.sha256": doc.calibration.sha256,
            "search.scoring_group": doc.search.scoring_group,
            "search.scores": doc.search.scores,
            **{f"versions.{k}": v for k, v in doc.versions.items()},
            **{f"override.{k}": v for k, v in scheme.overrides.items()},
        }
    )
    tracker.log_metrics(metrics_of(doc))
    _log_layers(tracker, doc.layers)
    from . import figures  # matplotlib: imported only when there is something to draw

    tracker.log_figure(figures.sensitivity(doc.layers, scheme.name), SENSITIVITY_FIGURE)
    if files is None:
        files = {
            n: out_dir / n
            for n in doc.artifacts.values()
            if _inside(out_dir, n) is not None and (out_dir / n).is_file()
        }
    for path in files.values():
        tracker.log_artifact(path)


def _log_layers(tracker: Tracker, rows: list[LayerRecord]) -> None:
    """Per-layer sensitivity and format series, and the layer table."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        pos = r.position()
        if pos is None:
            continue
        layer, proj = pos
        for fmt, score in r.scores.items():
            if fmt != BF16:
                series.setdefault(f"{SENSITIVITY_PREFIX}{fmt}/{proj}", []).append((layer, score))
        series.setdefault(f"{FORMAT_PREFIX}{proj}", []).append((layer, float(r.format == FP8)))
    tracker.log_series(series)
    tracker.log_table(
        [
            {
                "name": r.name,
                "group": r.group,
                "format": r.format,
                "quant_config": r.quant_config or "",
                "num_weights": r.num_weights,
                **{f"score:{k}": v for k, v in r.scores.items()},
            }
            for r in rows
        ],
        "layers.json",
    )
