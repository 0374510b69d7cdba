"""Plan the searches: schemes that can share one calibration and scoring pass form a family.

A family shares the method, the data, the score steps and the layer settings; its members may
differ in budget and in candidate formats. One AutoQuantize search over the union of the
members' formats serves them all (autoquant.py). A single run is a family of one.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..core.artifacts import SEARCH_CHECKPOINT, SEARCH_DIR
from ..core.errors import Problems
from ..core.timing import part
from ..search import resume
from ..search.spec import SearchSpec
from .calib_data import Data, build_data
from .inputs import Inputs, RunOptions
from .memory_plan import Shape
from .placement import LMPlacement, PlanRequest, plan_for
from .schemes import CALIBRATION_FIELDS, FORMAT_BITS, Scheme
from .validate import versions

log = logging.getLogger(__name__)
# Library versions that decide calibration and scores.
VERSIONED = ("torch", "transformers", "nvidia-modelopt")


@dataclass
class Family:
    schemes: list[Scheme]
    data: Data
    spec: SearchSpec
    fingerprint: dict
    checkpoint: Path
    reuse: resume.Reuse = field(default_factory=lambda: resume.Reuse(None))
    placement: LMPlacement | None = None  # GPUs and memory plan (None on a CPU machine)

    @property
    def key(self) -> str:
        return resume.fingerprint_hash(self.fingerprint)[:12]

    def grad_checkpointing(self, options: RunOptions) -> bool:
        """Whether this family's gradient search checkpoints: what the memory plan settled
        (`--grad-checkpointing auto` among them); without a plan (the CPU), on unless asked off."""
        if self.placement is not None:
            return self.placement.plan.grad_checkpointing
        return options.checkpointing_unless_planned


def spec_of(schemes: list[Scheme]) -> SearchSpec:
    first = schemes[0]
    union = sorted({f for s in schemes for f in s.formats}, key=list(FORMAT_BITS).index)
    return SearchSpec(
        formats=tuple(union),
        method=first.method,
        num_calib_steps=first.num_calib_steps,
        num_score_steps=first.num_score_steps,
        disabled_layers=tuple(first.disabled_layers),
        excluded_from_cost=tuple(first.excluded_from_cost),
        fused_scales=first.fused_scales,
    )


def fingerprint(inputs: Inputs, spec: SearchSpec, scheme: Scheme, data: Data) -> dict:
    """Everything that decides a search's calibration and scores (not the budgets)."""
    v = versions()
    view = {
        **{f: getattr(scheme, f) for f in CALIBRATION_FIELDS},
        "formats": list(spec.formats),
        "method": spec.method,
        "num_score_steps": spec.num_score_steps,
        "cost_excluded_layers": list(spec.excluded_from_cost),
    }
    return resume.fingerprint(
        model={
            "config_sha256": inputs.checkpoint.config_sha256,
            "weights": inputs.checkpoint.weights_fingerprint,
        },
        data={"tokens_sha256": data.calib.fingerprint, "steps": data.steps},
        scheme=view,
        versions={k: v[k] for k in VERSIONED},
    )


# The fingerprint keys that decide the calibration alone (shared across methods); the formats
# are compared as sets (`calibration_source`).
CALIBRATION_KEYS = (
    "model.config_sha256",
    "model.weights",
    "data.tokens_sha256",
    "data.steps",
    *(f"scheme.{f}" for f in CALIBRATION_FIELDS if f != "formats"),
    *(f"versions.{k}" for k in VERSIONED),
)


def _family_key(s: Scheme) -> tuple:
    view = s.scoring_view()
    view.pop("formats")
    return tuple(sorted((k, str(v)) for k, v in view.items()))


def _data_key(first: Scheme) -> tuple:
    """What a family's Data holds: schemes with the same key share one split and its batches."""
    return (
        first.num_calib_samples,
        first.num_eval_samples,
        first.seq_len,
        first.batch_size,
        first.seed,
        max(first.num_calib_steps, first.num_score_steps),
    )


def plan(inputs: Inputs, problems: Problems, single: bool = False) -> list[Family]:
    """Group the schemes into families; build each distinct data split once.

    `single`: one scheme into --output-dir, its checkpoint at search/autoquant_search.pth.
    """
    by_key: dict[tuple, list[Scheme]] = {}
    for s in inputs.schemes:
        by_key.setdefault(_family_key(s), []).append(s)
    datas: dict[tuple, Data] = {}
    families = []
    for members in by_key.values():
        with part("memory plan"):
            planned = plan_memory(inputs, members, problems)
        if planned is None and problems:
            return []
        placement, members = planned or (None, members)
        first = members[0]
        dkey = _data_key(first)
        if dkey not in datas:
            with part("batches"):
                built = build_data(inputs.tokenizer, inputs.captions, first, problems)
            if built is None:
                return []
            datas[dkey] = built
        spec = spec_of(members)
        fp = fingerprint(inputs, spec, first, datas[dkey])
        name = SEARCH_CHECKPOINT if single else f"group-{resume.fingerprint_hash(fp)[:12]}.pth"
        families.append(
            Family(
                members,
                datas[dkey],
                spec,
                fp,
                inputs.options.output_dir / SEARCH_DIR / name,
                placement=placement,
            )
        )
    for f in families:  # refuse foreign or stale checkpoints before loading anything
        f.reuse = resume.check_reusable(f.checkpoint, f.fingerprint, inputs.options.overwrite)
    _share_replicas(families)
    for note in dict.fromkeys(f.placement.note for f in families if f.placement is not None):
        if note:  # one line per run, not per family
            log.info(note)
    return families


def _share_replicas(families: list[Family]) -> None:
    """The LM is loaded once for every family. Replicas stay if every family's plan takes them,
    or searches on the first replica's GPU alone (too few steps to share: those run after the
    replicated ones, sweep.py); otherwise none are used. Each manifest records the placement
    that ran."""
    placed = [f.placement for f in families]
    reps = next((p.replicas for p in placed if p is not None and p.replicas), ())
    if not reps or all(p is not None and (p.replicas or p.placement.devices() == [reps[0]]) for p in placed):
        return
    log.info("not every search fits one GPU: the LM is not replicated")
    for f in families:
        if f.placement is not None:
            f.placement = dataclasses.replace(f.placement, replicas=())


def plan_memory(
    inputs: Inputs, members: list[Scheme], problems: Problems
) -> tuple[LMPlacement, list[Scheme]] | None:
    """Place the LM on the GPUs and pick the batch shape that fits, before anything is loaded.

    The catalog's 16x512 steps down to 8x512 with twice the steps (the same tokens), and so on.
    A batch size the user asked for explicitly is never changed: it is refused if it does not fit.
    """
    first, opts = members[0], inputs.options
    checkpointing = opts.checkpointing_unless_planned  # auto: the plan may turn it off below
    shape = Shape(first.batch_size, first.seq_len, first.method, checkpointing, len(spec_of(members).formats))
    request = PlanRequest(
        opts.gpus,
        opts.max_gpu_memory,
        shape,
        first.num_calib_steps,
        first.num_score_steps,
        opts.parallel,
        checkpointing_auto=opts.grad_checkpointing is None,
    )
    planned = plan_for(inputs.text_config, request, problems)
    if planned is None:
        return None
    placement, calib_steps, score_steps = planned
    batch = placement.plan.batch_size
    if batch == first.batch_size:
        return placement, members
    if "batch_size" in first.overrides:
        problems.add(
            "--batch-size",
            f"{first.batch_size}x{first.seq_len} does not fit the "
            f"GPUs' memory; {batch}x{first.seq_len} would",
            f"pass --batch-size {batch} --num-calib-steps {calib_steps} "
            f"--num-score-steps {score_steps} (the same tokens), or more --gpus",
        )
        return None
    update = {"batch_size": batch, "num_calib_steps": calib_steps, "num_score_steps": score_steps}
    return placement, [
        s.model_copy(update={**update, "overrides": {**s.overrides, **update}}) for s in members
    ]


def calibration_source(family: Family, done: list[Family]) -> Family | None:
    """An already searched family whose calibration `family` can start from: the same model,
    batches and calibration settings, calibrated over (a superset of) its formats."""
    for d in done:
        if set(family.spec.formats) <= set(d.spec.formats) and all(
            d.fingerprint.get(k) == family.fingerprint.get(k) for k in CALIBRATION_KEYS
        ):
            return d
    return None
