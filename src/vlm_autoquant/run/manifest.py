"""The per-layer manifest: built from the search result and the quantizers enabled in the model."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import ValidationError
from torch import nn

from ..core.artifacts import MANIFEST_SCHEMA_VERSION
from ..core.errors import Problem
from ..plan import cost
from ..plan.schemes import Scheme, _shown

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$")
FP8 = "FP8"
BF16 = "BF16"  # the name autoquant.format_name gives the no-quant candidate

if TYPE_CHECKING:
    from ..search.autoquant import SearchResult

_FIX = "use the manifest.json the run wrote (download the run's artifacts again), or rerun it"


def _group_label(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    prefix = names[0].rsplit(".", 1)[0]
    leaves = [n.rsplit(".", 1)[1] for n in names]
    return f"{prefix}.{{{','.join(leaves)}}}"


@dataclass
class LayerRow:
    name: str
    group: str
    format: str
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


def layer_rows(
    model: nn.Module, result: "SearchResult", disabled: list[str], excluded: list[str]
) -> list[LayerRow]:
    """One row per LM linear; the format is read from the model's enabled weight quantizer."""
    group_of = result.group_of()
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        wq = getattr(module, "weight_quantizer", None)
        fmt = FP8 if wq is not None and wq.is_enabled else BF16
        g = group_of.get(name)
        rows.append(
            LayerRow(
                name=name,
                group=_group_label(list(g.module_names) if g else [name]),
                format=fmt,
                quant_config=None if fmt == BF16 or g is None else g.chosen,
                num_weights=module.weight.numel(),
                scores=dict(g.scores) if g else {},
                costs=dict(g.costs) if g else {},
                cost_counted=not cost.matches(name, excluded),
                disabled=cost.matches(name, disabled),
            )
        )
    return rows


def summary(rows: list[LayerRow], excluded: list[str]) -> dict:
    numels = {r.name: r.num_weights for r in rows}
    bits = {r.name: r.bits for r in rows}
    groups = {r.group: r.format for r in rows}
    qbytes, fbytes = cost.weight_bytes(numels, bits), cost.weight_bytes(numels, dict.fromkeys(bits, 16))
    return {
        "layers": len(rows),
        "fp8": sum(r.format == FP8 for r in rows),
        "bf16": sum(r.format == BF16 for r in rows),
        "groups": len(groups),
        "groups_fp8": sum(f == FP8 for f in groups.values()),
        "effective_bits_searched": cost.effective_bits(numels, bits, excluded),
        "effective_bits_all_linears": cost.effective_bits(numels, bits, []),
        "weight_bytes": qbytes,
        "weight_bytes_bf16": fbytes,
        "compression_ratio": fbytes / qbytes if qbytes else float("nan"),
    }


def build(
    *,
    scheme: dict,
    model: dict,
    calibration: dict,
    effective_bits: dict,
    search: dict,
    rows: list[LayerRow],
    summary: dict,
    quality: dict | None,
    versions: dict,
    timings: dict,
    memory: dict,
    artifacts: dict,
    artifacts_sha256: dict | None = None,
    export: dict | None = None,
) -> dict:
    """Assemble the versioned manifest; the required keys are a contract with the export tool."""
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "scheme": scheme,
        "model": model,
        "calibration": calibration,
        "effective_bits": effective_bits,
        "search": search,
        "layers": [
            {
                "name": r.name,
                "group": r.group,
                "format": r.format,
                "quant_config": r.quant_config,
                "num_weights": r.num_weights,
                "scores": r.scores,
                "costs": r.costs,
                "cost_counted": r.cost_counted,
                "disabled": r.disabled,
            }
            for r in rows
        ],
        "summary": summary,
        "quality": quality,
        "versions": versions,
        "timings": timings,
        "memory": memory,
        "artifacts": artifacts,
        "artifacts_sha256": artifacts_sha256 or {},
        "export": export or {},
    }


def layers_csv(rows: list[LayerRow]) -> str:
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


def field_problems(doc: object, where: str) -> list[Problem]:
    """Every field of a manifest that the export and --log-only read, checked for its type
    before anything is loaded; each problem names the field (`scheme.seq_len`, `layers[3]`...)."""
    if not isinstance(doc, dict):
        return [Problem(where, "is not a JSON object", _FIX)]
    out: list[Problem] = []
    try:
        Scheme.model_validate(doc.get("scheme"))
    except ValidationError as exc:
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"])
            out.append(
                Problem(
                    f"{where}: scheme{'.' + loc if loc else ''}",
                    f"{e['msg']} (got {_shown(e.get('input'))})",
                    _FIX,
                )
            )
    for section, keys in (("model", ("directory",)), ("calibration", ("file",))):
        value = doc.get(section)
        for key in keys:
            if not isinstance(value, dict) or not isinstance(value.get(key), str):
                out.append(Problem(f"{where}: {section}.{key}", "missing or not a string", _FIX))
    layers = doc.get("layers")
    if not isinstance(layers, list):
        return out + [Problem(f"{where}: layers", "missing or not a list", _FIX)]
    for i, row in enumerate(layers):
        if not (
            isinstance(row, dict) and isinstance(row.get("name"), str) and row.get("format") in (FP8, BF16)
        ):
            out.append(
                Problem(
                    f"{where}: layers[{i}]",
                    f"needs a name and a format of {FP8} or {BF16} (got {_shown(row)})",
                    _FIX,
                )
            )
            break
    return out
