"""Everything the export needs, validated before any weight is loaded; every problem at once."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .. import tracking
from ..core import paths
from ..core.artifacts import EXPORT_REPORT_FILE as REPORT_FILE
from ..core.artifacts import MANIFEST_FILE, QUANT_STATE_FILE, check_replaced_dir
from ..core.errors import Problems, UsageError
from ..core.timing import Parts, Phases, human_bytes, part
from ..model import identity, prefetch
from ..model.checkpoint import CheckpointInfo, inspect_checkpoint
from ..run.manifest import Manifest
from ..run.manifest import read as read_manifest

log = logging.getLogger(__name__)
COMPRESSED_TENSORS = "compressed-tensors"
MODELOPT = "modelopt"
FORMATS = (COMPRESSED_TENSORS, MODELOPT, "both")  # --format


@dataclass
class ExportOptions:
    """The export's inputs, one field per CLI flag / MLproject parameter."""

    output_dir: Path
    run_id: str | None = None
    artifacts_dir: Path | None = None
    model_dir: Path | None = None  # default: the manifest's model.directory
    overwrite: bool = False
    lm_only: bool = False
    allow_other_weights: bool = False
    log_checkpoint: bool = False
    register: str | None = None
    experiment: str | None = None
    format: str = COMPRESSED_TENSORS  # one of FORMATS


@dataclass
class ExportInputs:
    options: ExportOptions
    model_dir: Path
    manifest: Manifest
    state_file: Path
    weights_sha256: str
    recorded_sha256: str | None
    payload: dict = field(default_factory=dict)  # the state as read and checked (read once)


def fetch_run(run_id: str, dst: Path, problems: Problems) -> tuple[Path | None, dict | None]:
    """Download a run's manifest and quantized state; (artifacts dir, run info) or problems."""
    run = tracking.source_run(run_id)
    fix = (
        "pass the id of a finished quantization run (see `mlflow runs list`) and check "
        f"MLFLOW_TRACKING_URI (now {tracking.shown_uri()})"
    )
    if run is None:
        problems.add("--run-id", f"no run {run_id!r} in the tracking store", fix)
        return None, None
    if run["status"] != "FINISHED":
        problems.add(
            "--run-id",
            f"run {run_id} is {run['status']}, not FINISHED",
            "export a finished run; rerun the quantization to finish this one",
        )
        return None, run
    files = tracking.download_run_files(run_id, [MANIFEST_FILE, QUANT_STATE_FILE], dst)
    missing = [n for n, p in files.items() if p is None]
    if missing:
        problems.add(
            "--run-id",
            f"run {run_id} has no {' or '.join(missing)} artifact (a sweep parent or a run of another tool?)",
            "pass the run id of a scheme's run (a sweep's child runs hold one each)",
        )
        return None, run
    return dst, run


def read_artifacts(
    folder: Path, flag: str, problems: Problems, model_dir: Path | None = None
) -> tuple[Manifest, Path, dict] | None:
    """The manifest, the quantized state's path and its payload, checked against the run's
    record: the state's bytes are read once, hashed and loaded from memory, so what is restored
    later is what was checked here. Once the manifest is read, the base checkpoint's weights
    (`model_dir`, else the manifest's) are prefetched while ModelOpt is imported."""
    man_path, state = folder / MANIFEST_FILE, folder / QUANT_STATE_FILE
    if not man_path.is_file() or not state.is_file():
        absent = [p.name for p in (man_path, state) if not p.is_file()]
        problems.add(
            flag,
            f"{folder} has no {' or '.join(absent)}: not a finished run's output",
            "pass the --output-dir of a finished quantization run (or --run-id)",
        )
        return None
    try:
        manifest = read_manifest(
            man_path, flag, "rerun the quantization, or download the run's artifacts again"
        )
    except UsageError as exc:
        problems.extend(exc.problems)
        return None
    prefetch.start(model_dir or Path(manifest.model.directory))  # hashed and restored below
    from ..model import quant_state  # ModelOpt: only once a run's manifest is read

    recorded = manifest.sha256_of(QUANT_STATE_FILE)
    if recorded is None:
        log.warning("the manifest records no sha256 of %s: not checked", state)
    try:
        payload = quant_state.read_state(state, manifest if recorded else None, where=flag)
    except UsageError as exc:
        problems.extend(exc.problems)
        return None
    found = quant_state.state_problems(payload, flag, manifest)
    if found:
        problems.extend(found)
        return None
    return manifest, state, payload


def check_output(opts: ExportOptions, model_dir: Path, needed: int, problems: Problems) -> None:
    """Not protected, new or replaceable (artifacts.check_replaced_dir); writable; room for the
    checkpoint."""
    out = opts.output_dir
    before = len(problems.items)
    check_replaced_dir(out, problems, opts.overwrite, REPORT_FILE, model_dir, opts.artifacts_dir)
    if len(problems.items) > before:
        return
    probe = next((p for p in (out, *out.parents) if paths.exists(p)), Path("/"))
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        problems.add(
            "--output-dir", f"{probe} is not writable ({exc.strerror})", "choose a directory you can write to"
        )
        return
    free = shutil.disk_usage(probe).free
    if free < needed:
        problems.add(
            "--output-dir",
            f"not enough disk space in {probe}: the checkpoint needs "
            f"about {human_bytes(needed)}, {human_bytes(free)} are free",
            "free disk space or choose an --output-dir on another disk",
        )


def check_base(opts: ExportOptions, model_dir: Path, problems: Problems) -> CheckpointInfo | None:
    before = len(problems.items)
    base = inspect_checkpoint(model_dir, problems)
    if base is not None and not base.vision_keys() and not opts.lm_only:
        problems.add(
            "--model-dir",
            f"{model_dir} has no vision tower (no visual.* tensors): "
            "the export would not be a Qwen2.5-VL checkpoint",
            "point --model-dir at the full Qwen2.5-VL checkpoint, or pass --lm-only to "
            "export the language model alone (recorded in the report)",
        )
    return base if len(problems.items) == before else None


@contextlib.contextmanager
def checked(opts: ExportOptions) -> Iterator[tuple[ExportInputs, Phases]]:
    """The export's inputs, `gathered` into a temporary work folder that lives as long as the
    block (the artifacts fetched there are read by the export), and its phase timer."""
    phases = Phases()
    with tempfile.TemporaryDirectory(prefix="vlm-export-") as work:
        yield gathered(opts, Path(work), phases), phases


def gathered(opts: ExportOptions, workdir: Path, phases: Phases) -> ExportInputs:
    """`gather` as the export's "validate" phase; raises UsageError with every problem. Imports
    neither torch nor ModelOpt, so bad input is refused in the time MLflow takes to answer."""
    problems, parts = Problems(), Parts()
    with parts.collecting(), phases("validate", parts.note):
        inputs = gather(opts, workdir, problems)
        problems.raise_if_any()
    return inputs


def gather(opts: ExportOptions, workdir: Path, problems: Problems) -> ExportInputs | None:
    """Resolve the run's artifacts and the base checkpoint; add every problem found."""
    run, folder, flag = None, opts.artifacts_dir, "--artifacts-dir"
    if (opts.run_id is None) == (opts.artifacts_dir is None):
        problems.add(
            "--run-id",
            "pass exactly one of --run-id and --artifacts-dir",
            "--run-id <MLflow run id> or --artifacts-dir <a run's --output-dir>",
        )
        return None
    if opts.run_id is not None:
        with part("MLflow"):
            folder, run = fetch_run(opts.run_id, workdir, problems)
        flag = "--run-id"
    with part("artifacts"):
        got = read_artifacts(folder, flag, problems, opts.model_dir) if folder is not None else None
    if got is None:
        return None
    manifest, state, payload = got
    model_dir = Path(opts.model_dir or manifest.model.directory)
    with part("base checkpoint"):
        base = check_base(opts, model_dir, problems)
    if base is None:
        return None
    needed = base.bytes_of(base.lm_keys()) + base.bytes_of(base.vision_keys()) + (64 << 20)
    check_output(opts, model_dir, needed, problems)
    if problems:  # refused now: the hashes below read every weight (minutes for a 72B)
        return None
    recorded, vision = manifest.model.weights_sha256, manifest.model.vision_sha256
    check_vision = vision is not None and not opts.lm_only and not opts.allow_other_weights
    if check_vision:
        identity.start(model_dir, vision=True)  # hashed beside the LM's weights
    with part("weights sha256"):
        actual = identity.result(model_dir)
        vision_actual = identity.vision_result(model_dir) if check_vision else None
    if recorded is not None and actual != recorded and not opts.allow_other_weights:
        problems.items.append(identity.mismatch(model_dir, recorded, actual))
    if check_vision and vision_actual != vision:
        problems.items.append(identity.vision_mismatch(model_dir, vision, vision_actual))
    if problems:
        return None
    return ExportInputs(opts, model_dir, manifest, state, actual, recorded, payload=payload)
