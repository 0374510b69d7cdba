"""The scheme catalog: one typed, strictly validated model per scheme, loaded from YAML."""

from __future__ import annotations

import re
import reprlib
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..core import paths
from ..core.errors import Problem, Problems, UsageError

MAX_CATALOG_BYTES = 16 << 20  # a catalog is a few KB; this only bounds a wrong file
# A catalog is a few hundred YAML values; aliases may not expand it past this (an alias bomb of
# 1 KB expands to billions, and every later walk over it, validation included, would too).
MAX_YAML_VALUES = 100_000

# ModelOpt config names a scheme may offer as candidates, with their weight bits.
# BF16 ("no quant") is always an implicit candidate.
FORMAT_BITS: dict[str, int] = {
    "FP8_DEFAULT_CFG": 8,  # per-tensor FP8 E4M3 weights and activations, max calibration
    "FP8_PER_CHANNEL_PER_TOKEN_CFG": 8,  # per-channel weights, dynamic per-token activations
}
FormatName = Literal["FP8_DEFAULT_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG"]
Method = Literal["gradient", "kl_div"]
# How fused siblings (q/k/v of one attention, gate/up of one MLP) in per-tensor FP8 are scaled.
# "shared-max": one weight and one input scale per group, the group's largest, as vLLM, SGLang
# and TensorRT-LLM re-quantize them when they fuse the projections at load; "per-module": each
# projection keeps its own calibrated scales (what the engines then change at load).
FusedScales = Literal["shared-max", "per-module"]
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

# Fields that decide the calibration (amax values) and the sensitivity scores. Two schemes that
# agree on these share one AutoQuantize search; effective_bits is only the budget of the solve.
CALIBRATION_FIELDS = (
    "formats",
    "num_calib_samples",
    "num_calib_steps",
    "seq_len",
    "batch_size",
    "seed",
    "disabled_layers",
    "fused_scales",
)
SCORING_FIELDS = CALIBRATION_FIELDS + ("method", "num_score_steps", "cost_excluded_layers")


class Scheme(BaseModel):
    """One quantization scheme. Every field is read by the driver; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str
    description: str = Field(min_length=1)
    formats: list[FormatName] = Field(min_length=1)
    effective_bits: float = Field(gt=0, le=16, allow_inf_nan=False)
    method: Method
    num_calib_samples: int = Field(gt=0)
    num_calib_steps: int = Field(gt=0)
    num_score_steps: int = Field(gt=0)
    num_eval_samples: int = Field(ge=0)  # 0 turns the quality evaluation off
    seq_len: int = Field(ge=16, le=32768)
    batch_size: int = Field(gt=0)
    seed: int = Field(ge=0)
    disabled_layers: list[str]  # never quantized (the tied lm_head by default)
    # Excluded from the effective-bits cost; null means "the disabled layers".
    cost_excluded_layers: list[str] | None = None
    fused_scales: FusedScales = "shared-max"  # the served arithmetic (see FusedScales)
    overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not NAME_RE.match(v) or ".." in v:
            raise ValueError(
                "use lowercase letters, digits, '.', '_' and '-' (no '..', no '/'), at most 64 characters"
            )
        return v

    @field_validator("formats")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("lists a format twice")
        return v

    @property
    def excluded_from_cost(self) -> list[str]:
        return list(self.disabled_layers if self.cost_excluded_layers is None else self.cost_excluded_layers)

    def scoring_view(self) -> dict[str, Any]:
        """The settings that decide the search's calibration and scores."""
        view = {f: getattr(self, f) for f in SCORING_FIELDS}
        view["cost_excluded_layers"] = self.excluded_from_cost
        return view

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (plain safe_load keeps the last one)."""


def _no_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


class AliasBomb(yaml.YAMLError):
    """The document's aliases expand it beyond MAX_YAML_VALUES values (or into a cycle)."""


def _expanded_size(root: yaml.Node) -> float:
    """How many values the node graph holds once every alias is expanded (inf for a cycle);
    each distinct node is visited once, so this is fast however large the expansion."""
    size: dict[int, float] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    visiting: set[int] = set()
    while stack:
        node, done = stack.pop()
        kids = _children(node)
        if done:
            visiting.discard(id(node))
            size[id(node)] = 1 + sum(size[id(k)] for k in kids)
            continue
        if id(node) in size:
            continue
        if id(node) in visiting:
            return float("inf")  # an alias inside its own anchor
        visiting.add(id(node))
        stack.append((node, True))
        for kid in kids:
            if id(kid) in visiting:
                return float("inf")
            if id(kid) not in size:
                stack.append((kid, False))
    return size[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def load_yaml(text: str) -> Any:
    """Parse `text` with the duplicate-refusing SafeLoader, refusing before any value is built
    a document whose aliases expand it past MAX_YAML_VALUES (AliasBomb)."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_YAML_VALUES:
            raise AliasBomb(f"its aliases expand it to more than {MAX_YAML_VALUES} values")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _shown(value: Any, limit: int = 80) -> str:
    """repr of a user's value, cut short: a message never echoes a large structure."""
    text = reprlib.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _describe(err: dict, where: str) -> Problem:
    loc = ".".join(str(p) for p in err["loc"])
    key = f"{where}.{loc}" if loc else where
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(f for f in Scheme.model_fields if f not in ("name", "overrides"))
        return Problem(key, "unknown key", f"remove it or use one of: {allowed}")
    if err["type"] == "missing":
        return Problem(key, "required key is missing", "add it (see configs/schemes.yaml)")
    if err["type"] == "literal_error" and "formats" in loc:
        return Problem(
            key, f"unknown ModelOpt format {_shown(err['input'])}", f"use one of: {', '.join(FORMAT_BITS)}"
        )
    return Problem(
        key,
        f"{err['msg']} (got {_shown(err.get('input'))})",
        "fix the value; expected types are listed in configs/schemes.yaml",
    )


def validate_scheme(data: dict[str, Any], where: str) -> Scheme:
    """Validate one scheme dict; raise UsageError naming `where` and each bad key."""
    try:
        return Scheme.model_validate(data)
    except ValidationError as exc:
        raise UsageError([_describe(e, where) for e in exc.errors()]) from None


def default_catalog() -> Traversable:
    """The catalog that ships with the package: the repo's configs/schemes.yaml.

    An install (wheel or editable) maps configs/ to the package `vlm_autoquant.configs`; a source
    tree put on sys.path without installing reads the file next to src/.
    """
    try:
        return resources.files("vlm_autoquant.configs") / "schemes.yaml"
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[3] / "configs" / "schemes.yaml"


def load_catalog(path: Path | Traversable) -> dict[str, Scheme]:
    """Load and validate every scheme of a catalog file (`defaults` merged into each)."""
    where = str(path)
    doc = _parse_catalog(_read_catalog(path, where), where)
    unknown = set(doc) - {"schema_version", "defaults", "schemes"}
    problems = Problems()
    for key in sorted(unknown):
        problems.add(
            f"{where}.{key}", "unknown top-level key", "use only schema_version, defaults and schemes"
        )
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.add(f"{where}.defaults", "must be a mapping", "write key: value pairs")
        defaults = {}
    catalog: dict[str, Scheme] = {}
    for name, body in doc["schemes"].items():
        scheme_where = f"{where}: schemes.{name}"
        if not isinstance(body, dict):
            problems.add(scheme_where, "must be a mapping of settings", "see the other schemes")
            continue
        try:
            catalog[str(name)] = validate_scheme({**defaults, **body, "name": str(name)}, scheme_where)
        except UsageError as exc:
            problems.extend(exc.problems)
    problems.raise_if_any()
    return catalog


def _read_catalog(path: Path | Traversable, where: str) -> str:
    """The catalog's text; a missing, unreadable or non-text file is a UsageError."""
    try:
        return paths.read_regular(path, MAX_CATALOG_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise UsageError(
            Problem(where, "catalog file not found", "pass --catalog PATH or restore configs/schemes.yaml")
        ) from None
    except OSError as exc:
        raise UsageError(Problem(where, *paths.describe_oserror(path, exc))) from None
    except (paths.NotARegularFile, UnicodeDecodeError) as exc:
        raise UsageError(
            Problem(where, f"cannot read the catalog: {exc}", "pass a YAML text file (--catalog PATH)")
        ) from None


def _parse_catalog(text: str, where: str) -> dict:
    """The catalog's YAML as a mapping with a non-empty `schemes` mapping, else a UsageError."""
    try:
        doc = load_yaml(text)  # a SafeLoader: no arbitrary objects
    except AliasBomb as exc:
        raise UsageError(
            Problem(
                where,
                f"refused: {exc} (an alias bomb?)",
                "write the catalog without aliases nested inside aliases",
            )
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        fix = (
            "rename or remove one of the two entries"
            if "duplicate key" in problem
            else "fix the YAML syntax at that line"
        )
        raise UsageError(Problem(f"{where}{line}", f"malformed YAML: {problem}", fix)) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("schemes"), dict) or not doc["schemes"]:
        raise UsageError(
            Problem(
                where,
                "expected a mapping with a non-empty 'schemes' mapping",
                "see configs/schemes.yaml for the layout",
            )
        )
    return doc


def resolve(
    catalog: dict[str, Scheme], name: str, overrides: dict[str, Any], flags: dict[str, str] | None = None
) -> Scheme:
    """Pick a scheme and apply CLI overrides (None = keep the scheme's value).

    `flags` maps a field to the CLI flag that set it, for error messages.
    """
    if name not in catalog:
        raise UsageError(
            Problem(
                "--scheme-name",
                f"unknown scheme {name!r}",
                f"use one of: {', '.join(catalog)} (see --list-schemes)",
            )
        )
    given = {k: v for k, v in overrides.items() if v is not None}
    base = catalog[name]
    changed = {k: v for k, v in given.items() if getattr(base, k) != v}
    data = {**base.model_dump(), **given, "overrides": changed}
    try:
        return Scheme.model_validate(data)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            field = str(e["loc"][0]) if e["loc"] else ""
            flag = (
                (flags or {}).get(field, "--" + field.replace("_", "-"))
                if field in given
                else f"scheme {name}.{field}"
            )
            problems.append(
                Problem(
                    flag, f"{e['msg']} (got {_shown(e.get('input'))})", "pass a value in the allowed range"
                )
            )
        raise UsageError(problems) from None


def describe_catalog(catalog: dict[str, Scheme]) -> str:
    """A human-readable table of the catalog for --list-schemes."""
    lines = [f"{'scheme':24} {'bits':>5} {'method':8} {'formats':44} description"]
    for s in catalog.values():
        lines.append(
            f"{s.name:24} {s.effective_bits:>5g} {s.method:8} {'+'.join(s.formats):44} {s.description}"
        )
    return "\n".join(lines)
