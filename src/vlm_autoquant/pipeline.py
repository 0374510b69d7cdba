"""One scheme, end to end: search (or resume), evaluate, save atomically, log to MLflow."""

from __future__ import annotations

import logging
import platform
from concurrent.futures import ThreadPoolExecutor
import sys
from pathlib import Path

import torch
from torch import nn

from . import artifacts, autoquant, figures, integrity, manifest, quality, quant_state, resume
from .constants import (
    FORMAT_PREFIX, LAYERS_FILE, LM_WEIGHTS_FILE, M_BITS_ACHIEVED, M_BITS_ALL, M_BITS_TARGET,
    M_CALIB_TOKENS, M_COMPRESSION, M_KL, M_LAYERS_BF16, M_LAYERS_FP8, M_PADDING, M_PEAK_GPU,
    M_PEAK_RSS, M_PPL_QUANT, M_PPL_REF, M_PPL_REL, M_TOP1, M_WEIGHT_BYTES, M_WEIGHT_BYTES_BF16,
    MANIFEST_FILE, QUANT_STATE_FILE, SCHEME_FILE, SEARCH_CHECKPOINT, SEARCH_DIR,
    SENSITIVITY_FIGURE, SENSITIVITY_PREFIX, TIME_PREFIX,
)
from .inputs import Data, Inputs
from .phases import Phases, gpu_peak_gib, peak_rss_gib, since_process_start
from .schemes import CALIBRATION_FIELDS, Scheme

log = logging.getLogger("vlm_autoquant")


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": torch.cuda.get_device_name()
           if torch.cuda.is_available() else "cpu"}
    for name in ("transformers", "nvidia-modelopt", "datasets", "mlflow", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def scoring_fingerprint(inputs: Inputs, scheme: Scheme, data: Data) -> dict:
    """Everything that decides the search's calibration and scores (not the budget)."""
    v = versions()
    return resume.fingerprint(
        model={"config_sha256": inputs.checkpoint.config_sha256,
               "weights": inputs.checkpoint.weights_fingerprint},
        data={"tokens_sha256": data.calib.fingerprint, "steps": data.steps},
        scheme=scheme.scoring_view(),
        versions={k: v[k] for k in ("torch", "transformers", "nvidia-modelopt")})


# The fingerprint keys that decide the calibration alone (a sweep shares it across methods).
CALIBRATION_KEYS = ("model.config_sha256", "model.weights", "data.tokens_sha256", "data.steps",
                    *(f"scheme.{f}" for f in CALIBRATION_FIELDS),
                    "versions.torch", "versions.transformers", "versions.nvidia-modelopt")


def _on_device(batches: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in batches]


def quantize_scheme(model: nn.Module, scheme: Scheme, inputs: Inputs, data: Data, out_dir: Path,
                    checkpoint: Path, fp: dict, get_tracker, phases: Phases, device: torch.device,
                    stop=None, search_info: dict | None = None) -> dict:
    """Search (or restore) `scheme` on `model`, then evaluate, save and log it; return the manifest.

    `get_tracker()` returns the MLflow tracker (or None); it is called only when the results are
    logged, so a run that is still starting in the background overlaps with the search.
    """
    opts = inputs.options
    batches = _on_device(data.calib.batches[: data.steps], device)
    state, srun = autoquant.run_auto_quantize(
        model, scheme, batches, checkpoint, lambda p, stage, src=None: resume.write_record(p, fp, stage, src),
        stop=stop, grad_checkpointing=opts.grad_checkpointing)
    for key in ("calibrate", "score", "solve"):
        phases.add(key, srun.timings.get(key, 0.0))
    # ModelOpt's own set-up inside auto_quantize: quantizer insertion, search space, restore.
    phases.add("search_setup", srun.timings["auto_quantize"] - sum(
        srun.timings.get(k, 0.0) for k in ("calibrate", "score", "solve")))
    log.info("search: calibration %s, scores %s (%s)",
             "ran" if srun.calibrated else "restored from checkpoint",
             "ran" if srun.scored else "restored from checkpoint", checkpoint)
    excluded = scheme.excluded_from_cost
    rows = manifest.layer_rows(model, state, scheme.disabled_layers, excluded)
    summ = manifest.summary(rows, excluded)
    log.info("%s: %d/%d LM linears FP8, %.3f effective bits (target %g), %.3f over all linears",
             scheme.name, summ["fp8"], summ["layers"], summ["effective_bits_searched"],
             scheme.effective_bits, summ["effective_bits_all_linears"])
    qual = None
    if data.eval is not None:
        with phases("evaluate", f"{len(data.eval.batches)} held-out batches"):
            qual = quality.evaluate(model, data.eval.batches, device)
        log.info("quality: KL %.4g, top-1 %.4f, ppl %.4g -> %.4g", qual["kl_mean"],
                 qual["top1_agreement"], qual["ppl_ref"], qual["ppl_quant"])
    # The MLflow run may still be starting in another thread, which imports IPython & co.;
    # matplotlib inspects sys.modules for IPython, so no plotting until that thread is done.
    with phases("track", "waiting for the MLflow run to start"):
        tracker = get_tracker()
    fig = figures.sensitivity(rows, scheme.name)
    rel = {name: name for name in (MANIFEST_FILE, QUANT_STATE_FILE, SCHEME_FILE, LAYERS_FILE)}
    with phases("save"):
        quant_state.save(model, out_dir / QUANT_STATE_FILE,
                         extra={"scheme": scheme.name, "model_config_sha256":
                                inputs.checkpoint.config_sha256})
        if opts.save_weights:
            quant_state.save_weights(model, out_dir / LM_WEIGHTS_FILE)
            rel[LM_WEIGHTS_FILE] = LM_WEIGHTS_FILE
        artifacts.write_text(out_dir / SCHEME_FILE, scheme.to_yaml())
        artifacts.write_text(out_dir / LAYERS_FILE, manifest.layers_csv(rows))
    metrics = {
        M_BITS_ACHIEVED: summ["effective_bits_searched"], M_BITS_TARGET: scheme.effective_bits,
        M_BITS_ALL: summ["effective_bits_all_linears"], M_LAYERS_FP8: summ["fp8"],
        M_LAYERS_BF16: summ["bf16"], M_WEIGHT_BYTES: summ["weight_bytes"],
        M_WEIGHT_BYTES_BF16: summ["weight_bytes_bf16"], M_COMPRESSION: summ["compression_ratio"],
        M_PADDING: data.used_padding_fraction(), M_CALIB_TOKENS: data.used_tokens()[0],
    }
    if qual:
        metrics.update({M_KL: qual["kl_mean"], M_PPL_REF: qual["ppl_ref"],
                        M_PPL_QUANT: qual["ppl_quant"], M_PPL_REL: qual["ppl_rel_change"],
                        M_TOP1: qual["top1_agreement"]})
    search = {"method": scheme.method, "formats": list(scheme.formats),
              "checkpoint": str(checkpoint), "checkpoint_sha256": artifacts.sha256_file(checkpoint),
              "calibration": "ran" if srun.calibrated else "restored",
              "scores": "ran" if srun.scored else "restored",
              "scoring_group": resume.fingerprint_hash(fp)[:12],
              "modelopt_effective_bits": state["best"]["constraints"].get("effective_bits"),
              **(search_info or {})}
    with phases("log"):
        if tracker is not None:
            _log_run(tracker, scheme, inputs, metrics, rows, fig, out_dir, rel, search)
    timings = {**phases.seconds, "run": phases.total(), "process": since_process_start()}
    doc = manifest.build(
        scheme=scheme.model_dump(),
        model={"directory": str(opts.model_dir), "model_type": inputs.checkpoint.model_type,
               "config_sha256": inputs.checkpoint.config_sha256,
               "weights_fingerprint": inputs.checkpoint.weights_fingerprint,
               "parameters": {"lm": sum(p.numel() for p in model.parameters()
                                        if p.dtype.is_floating_point),
                              "lm_linear_weights": sum(inputs.numels.values()),
                              "vision_tensors_skipped": len(inputs.checkpoint.vision_keys()),
                              "vision_bytes_skipped": inputs.checkpoint.bytes_of(
                                  inputs.checkpoint.vision_keys())}},
        calibration={"file": str(inputs.calib_path), "sha256": inputs.caption_file.sha256,
                     "crlf": inputs.caption_file.crlf, "captions_used": data.used_captions(),
                     "captions_packed": data.calib.captions, "batches": data.steps,
                     "tokens": data.used_tokens()[0],
                     "padding_fraction": data.used_padding_fraction(),
                     "truncated": data.calib.truncated, "seq_len": scheme.seq_len,
                     "batch_size": scheme.batch_size, "split": data.split.record},
        effective_bits={"target": scheme.effective_bits,
                        "achieved": summ["effective_bits_searched"],
                        "all_linears": summ["effective_bits_all_linears"],
                        "excluded_from_cost": excluded},
        search=search, rows=rows, summary=summ, quality=qual, versions=versions(),
        timings=timings, memory={"peak_gpu_gib": gpu_peak_gib(), "peak_rss_gib": peak_rss_gib()},
        artifacts=rel)
    doc["artifact_sha256"] = integrity.artifact_digests(  # quant_state.apply checks these
        out_dir, [n for n in rel.values() if n != MANIFEST_FILE])
    artifacts.write_json(out_dir / MANIFEST_FILE, doc)  # last: its presence marks a finished run
    if tracker is not None:
        tracker.log_artifact(out_dir / MANIFEST_FILE)
    return doc


def _param(value) -> str:
    """Params as a user reads them in the UI: lists comma-joined, None as "null"."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "null" if value is None else str(value)


def _log_run(tracker, scheme: Scheme, inputs: Inputs, metrics: dict, rows, fig, out_dir: Path,
             rel: dict, search: dict) -> None:
    tracker.log_params({f"scheme.{k}": _param(v) for k, v in scheme.model_dump().items()
                        if k not in ("description", "overrides")}
                       | {"scheme.overrides": ",".join(sorted(scheme.overrides)) or "none",
                          "model_dir": str(inputs.options.model_dir),
                          "calib_file": str(inputs.calib_path)})
    v = versions()
    tracker.set_tags({"scheme": scheme.name, "model.config_sha256": inputs.checkpoint.config_sha256,
                      "data.sha256": inputs.caption_file.sha256,
                      "search.scoring_group": search["scoring_group"],
                      "search.scores": search["scores"],
                      **{f"versions.{k}": val for k, val in v.items()},
                      **{f"override.{k}": val for k, val in scheme.overrides.items()}})
    tracker.log_metrics(metrics)
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        pos = r.position()
        if pos is None:
            continue
        layer, proj = pos
        for fmt, score in r.scores.items():
            if fmt != "BF16":
                series.setdefault(f"{SENSITIVITY_PREFIX}{fmt}/{proj}", []).append((layer, score))
        series.setdefault(f"{FORMAT_PREFIX}{proj}", []).append((layer, float(r.format == "FP8")))
    tracker.log_series(series)
    tracker.log_table([{"name": r.name, "group": r.group, "format": r.format,
                        "quant_config": r.quant_config or "", "num_weights": r.num_weights,
                        **{f"score:{k}": v for k, v in r.scores.items()}} for r in rows],
                      "layers.json")
    tracker.log_figure(fig, SENSITIVITY_FIGURE)
    for name in rel.values():
        if name != MANIFEST_FILE and (out_dir / name).exists():
            tracker.log_artifact(out_dir / name)


def final_metrics(phases: Phases) -> dict:
    out = {f"{TIME_PREFIX}{k}_s": v for k, v in phases.seconds.items()}
    out[f"{TIME_PREFIX}total_s"] = phases.total()
    out[M_PEAK_GPU] = gpu_peak_gib()
    out[M_PEAK_RSS] = peak_rss_gib()
    return out


def search_checkpoint(out_dir: Path) -> Path:
    return out_dir / SEARCH_DIR / SEARCH_CHECKPOINT


def announce(inputs: Inputs, scheme: Scheme) -> None:
    """Log the resolved configuration at the start of the run."""
    log.info("scheme %s (%s): %s", scheme.name, scheme.method, scheme.description)
    for line in scheme.to_yaml().splitlines():
        log.info("  %s", line)
    log.info("model %s, calibration %s, output %s", inputs.options.model_dir, inputs.calib_path,
             inputs.options.output_dir)
    log.info("python %s, torch %s on %s", sys.version.split()[0], torch.__version__,
             "cuda" if torch.cuda.is_available() else "cpu")


def run_single(inputs: Inputs, data: Data, stop, tracker_factory,
               before: dict[str, float] | None = None) -> dict:
    """The `main` entry point: one scheme into --output-dir, tracked as one MLflow run.

    `before` carries timings measured before this call (startup, validate).
    """
    from .lm import load_lm, pick_device

    scheme = inputs.schemes[0]
    opts = inputs.options
    phases = Phases()
    for key, seconds in (before or {}).items():
        phases.add(key, seconds)
    phases.add("data", data.seconds)
    if before:
        log.info("%-10s %7.2f s  (interpreter, imports, validation %.2f s, data %.2f s)", "startup",
                 before.get("startup", 0.0), before.get("validate", 0.0), data.seconds)
    checkpoint = search_checkpoint(opts.output_dir)
    fp = scoring_fingerprint(inputs, scheme, data)
    reuse = resume.check_reusable(checkpoint, fp, opts.overwrite)  # may refuse before loading
    announce(inputs, scheme)
    if reuse.stage:
        log.info("resuming: %s search checkpoint %s (sha256 %s...) matches these settings",
                 reuse.stage, checkpoint, reuse.sha256[:12])
    # The MLflow run starts in the background during the load and the search (its store was
    # already checked to be reachable); results are logged once it exists.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-start")
    pending = pool.submit(tracker_factory, scheme.name)
    pool.shutdown(wait=False)
    tracker = None
    try:
        kernel = autoquant.select_fp8_kernel(opts.fp8_kernel)
        device = pick_device()
        with phases("load", f"LM only, {len(inputs.checkpoint.vision_keys())} vision tensors "
                            f"left unread"):
            model, _ = load_lm(opts.model_dir, inputs.text_config, device)
        doc = quantize_scheme(model, scheme, inputs, data, opts.output_dir, checkpoint, fp,
                                  pending.result, phases, device, stop,
                                  {"fp8_kernel": kernel, "resumed_from": reuse.stage})
        tracker = pending.result()
        if tracker is not None:
            tracker.log_metrics(final_metrics(phases))
            tracker.end("FINISHED")
        log.info("done in %.1f s: %s", phases.total(), opts.output_dir / MANIFEST_FILE)
        return doc
    except BaseException as exc:
        if tracker is None:  # never leave the run RUNNING: wait for it, then mark it
            try:
                tracker = pending.result(timeout=300)
            except Exception:  # noqa: BLE001 - the run could not even start
                tracker = None
        if tracker is not None:
            from .errors import Interrupted

            status = "KILLED" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "FAILED"
            tracker.end(status, f"{type(exc).__name__}: {exc}")
        raise
