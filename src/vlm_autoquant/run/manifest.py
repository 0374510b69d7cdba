"""The per-layer manifest: one typed record of a finished scheme, written once as manifest.json
and read back by attribute (the sweep, the report, --log-only, the export, restore).

Pure: no torch and no ModelOpt, so the export's and --log-only's checks read it before anything
heavy loads. The rows themselves are read from the model's quantizers by `save.layer_rows`.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from ..core import paths
from ..core.artifacts import MANIFEST_SCHEMA_VERSION
from ..core.errors import Problem, UsageError
from ..plan import cost
from ..plan.schemes import FusedScales, Scheme, _shown

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")
FP8 = "FP8"
BF16 = "BF16"  # the name autoquant.format_name gives the no-quant candidate
# The layout of manifest.json this code writes and reads. Files without the key were written
# before it existed (layout 1); files with a larger number by a newer vlm-autoquant.
MANIFEST_VERSION = 2
MAX_MANIFEST_BYTES = 64 << 20  # a 3B manifest is ~200 KB; this only bounds a wrong file
_FIX = "use the manifest.json the run wrote (download the run's artifacts again), or rerun it"


class _Section(BaseModel):
    """A part of the manifest: typed where the code reads it; unknown keys are kept as written."""

    model_config = ConfigDict(extra="allow", strict=True)


class LayerRecord(_Section):
    """One LM linear: its format, the search's scores and costs for each candidate."""

    name: str
    group: str
    format: Literal["FP8", "BF16"]
    quant_config: str | None
    num_weights: int
    scores: dict[str, float]
    costs: dict[str, float]
    cost_counted: bool
    disabled: bool

    @property
    def bits(self) -> int:
        return 8 if self.format == FP8 else 16

    def position(self) -> tuple[int, str] | None:
        """(decoder layer index, projection) for figures and per-layer metrics."""
        m = LAYER_RE.match(self.name)
        return (int(m.group(1)), m.group(3)) if m else None


LayerRow = LayerRecord  # the name figures.py and the layer tests use


class ModelInfo(_Section):
    directory: str
    model_type: str | None
    config_sha256: str
    weights_fingerprint: str | None
    weights_sha256: str | None
    vision_sha256: str | None
    parameters: dict[str, int]


class Calibration(_Section):
    file: str
    sha256: str
    crlf: bool
    captions_used: int
    captions_packed: int
    batches: int
    tokens: int
    padding_fraction: float
    truncated: int
    seq_len: int
    batch_size: int
    split: dict[str, Any]


class EffectiveBits(_Section):
    target: float
    achieved: float
    all_linears: float
    excluded_from_cost: list[str]


class SearchInfo(_Section):
    """How the search ran; a sweep adds its own bookkeeping keys (`sweep_group_index`...)."""

    method: str
    formats: list[str]
    checkpoint: str
    checkpoint_sha256: str
    calibration: str  # ran, restored or shared
    scores: str  # ran, restored or shared
    modelopt_effective_bits: float | None
    predicted_loss: float | None
    scoring_group: str
    fp8_kernel: str


class Summary(_Section):
    layers: int
    fp8: int
    bf16: int
    groups: int
    groups_fp8: int
    effective_bits_searched: float
    effective_bits_all_linears: float
    weight_bytes: int
    weight_bytes_bf16: int
    compression_ratio: float


class Quality(_Section):
    kl_mean: float
    top1_agreement: float
    ppl_ref: float
    ppl_quant: float
    ppl_rel_change: float


class Memory(_Section):
    """Measured peaks; with a memory plan, its `placement` and `memory_plan` beside them."""

    peak_gpu_gib: float | None
    peak_rss_gib: float | None


class ExportInfo(_Section):
    fused_scales: FusedScales  # how an engine's fused layers are scaled


class Manifest(_Section):
    """manifest.json: what a finished scheme is, how it was searched and what it measured."""

    manifest_version: int = MANIFEST_VERSION
    schema_version: int = MANIFEST_SCHEMA_VERSION
    scheme: Scheme
    model: ModelInfo
    calibration: Calibration
    effective_bits: EffectiveBits
    search: SearchInfo
    layers: list[LayerRecord]
    summary: Summary
    quality: Quality | None
    versions: dict[str, str | None]
    timings: dict[str, float]
    memory: Memory
    artifacts: dict[str, str]
    artifacts_sha256: dict[str, str]
    export: ExportInfo

    def to_json(self) -> dict[str, Any]:
        """The JSON document: every field, then the unknown keys it was read with."""
        return self.model_dump()

    def sha256_of(self, artifact: str) -> str | None:
        """The sha256 the run recorded for one of its files (None: not recorded)."""
        return self.artifacts_sha256.get(artifact)

    def fp8_layers(self) -> dict[str, str | None]:
        """{FP8 layer name: its ModelOpt config}."""
        return {r.name: r.quant_config for r in self.layers if r.format == FP8}


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".")


def _version_problem(doc: dict, where: str) -> Problem | None:
    version = doc.get("manifest_version")
    if isinstance(version, int) and not isinstance(version, bool) and version == MANIFEST_VERSION:
        return None
    if version is None:
        return Problem(
            where,
            "has no manifest_version: a vlm-autoquant from before versioned manifests wrote it "
            f"(manifest layout 1); this vlm-autoquant reads manifest_version {MANIFEST_VERSION}",
            "rerun the scheme with this vlm-autoquant, or export it with the vlm-autoquant that wrote it",
        )
    if isinstance(version, int) and not isinstance(version, bool) and version > MANIFEST_VERSION:
        return Problem(
            where,
            f"has manifest_version {version}, newer than the {MANIFEST_VERSION} this vlm-autoquant reads",
            "upgrade vlm-autoquant (pip install -U vlm-autoquant), or rerun the scheme with this one",
        )
    return Problem(
        where,
        f"has manifest_version {_shown(version)}; this vlm-autoquant reads {MANIFEST_VERSION}",
        "rerun the scheme with this vlm-autoquant, or export it with the vlm-autoquant that wrote it",
    )


def field_problems(doc: object, where: str) -> list[Problem]:
    """Why `doc` is not a manifest this code reads: its version, then every invalid field,
    each named by its path (`scheme.seq_len`, `layers[3].format`, `model.directory`); the
    rows after the first bad one are not listed."""
    if not isinstance(doc, dict):
        return [Problem(where, "is not a JSON object", _FIX)]
    version = _version_problem(doc, where)
    if version is not None:
        return [version]
    try:
        Manifest.model_validate(doc)
    except ValidationError as exc:
        out, first_row = [], None
        for e in exc.errors():
            loc = e["loc"]
            if loc[:1] == ("layers",) and len(loc) > 1:
                first_row = loc[1] if first_row is None else first_row
                if loc[1] != first_row:
                    continue
            got = "missing" if e["type"] == "missing" else f"got {_shown(e.get('input'))}"
            out.append(Problem(f"{where}: {_where(loc)}", f"{e['msg']} ({got})", _FIX))
        return out
    return []


def parse(doc: object, where: str) -> Manifest:
    """`doc` (a JSON value) as a Manifest; a UsageError naming every problem otherwise."""
    problems = field_problems(doc, where)
    if problems:
        raise UsageError(problems)
    return Manifest.model_validate(doc)


def load(raw: bytes, where: str) -> Manifest:
    """The manifest in `raw` (a file's bytes); `where` names the file in any problem."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise UsageError(Problem(where, f"is not JSON ({exc})", _FIX)) from None
    return parse(doc, where)


def read(path: Path, flag: str, fix: str) -> Manifest:
    """The manifest at `path`; an unreadable file is a problem of `flag`, with `fix`."""
    try:
        raw = paths.read_regular(path, MAX_MANIFEST_BYTES)
    except (OSError, paths.NotARegularFile) as exc:
        raise UsageError(Problem(flag, f"{path} is not a readable manifest ({exc})", fix)) from None
    return load(raw, str(path))


def summary(rows: list[LayerRecord], excluded: list[str]) -> Summary:
    """Counts, effective bits and weight bytes of the rows (`excluded`: left out of the cost)."""
    numels = {r.name: r.num_weights for r in rows}
    bits = {r.name: r.bits for r in rows}
    groups = {r.group: r.format for r in rows}
    qbytes, fbytes = cost.weight_bytes(numels, bits), cost.weight_bytes(numels, dict.fromkeys(bits, 16))
    return Summary(
        layers=len(rows),
        fp8=sum(r.format == FP8 for r in rows),
        bf16=sum(r.format == BF16 for r in rows),
        groups=len(groups),
        groups_fp8=sum(f == FP8 for f in groups.values()),
        effective_bits_searched=cost.effective_bits(numels, bits, excluded),
        effective_bits_all_linears=cost.effective_bits(numels, bits, []),
        weight_bytes=qbytes,
        weight_bytes_bf16=fbytes,
        compression_ratio=fbytes / qbytes if qbytes else float("nan"),
    )


def layers_csv(rows: list[LayerRecord]) -> str:
    """layers.csv: one line per row, a score and a cost column per candidate."""
    candidates = sorted({c for r in rows for c in r.scores})
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(
        [
            "name",
            "group",
            "format",
            "quant_config",
            "num_weights",
            "cost_counted",
            *[f"score:{c}" for c in candidates],
            *[f"cost:{c}" for c in candidates],
        ]
    )
    for r in rows:
        w.writerow(
            [
                r.name,
                r.group,
                r.format,
                r.quant_config or "",
                r.num_weights,
                r.cost_counted,
                *[r.scores.get(c, "") for c in candidates],
                *[r.costs.get(c, "") for c in candidates],
            ]
        )
    return out.getvalue()
