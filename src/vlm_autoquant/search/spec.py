"""What one AutoQuantize search is, independent of the schemes it serves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

KL_CHUNK_BYTES = 2**28  # autoquant.py computes kl_div's loss in row chunks of about this size


@dataclass(frozen=True)
class SearchSpec:
    """What one auto_quantize call searches: the settings a family of schemes shares."""

    formats: tuple[str, ...]  # union of the family's candidate formats
    method: str
    num_calib_steps: int
    num_score_steps: int
    disabled_layers: tuple[str, ...]
    excluded_from_cost: tuple[str, ...]
    fused_scales: str = "shared-max"  # schemes.FusedScales: applied right after calibration


@dataclass(frozen=True)
class SearchCheckpoint:
    """Where a search checkpoints, and how each checkpoint written is recorded.

    `record(final, stage, tmp)` runs once the checkpoint is complete under its temporary name
    `tmp` and before the rename to `final` (resume.write_record signs its sha256); `stage` is
    "calibrated" or "scored".
    """

    path: Path
    record: Callable[[Path, str, Path], str]
