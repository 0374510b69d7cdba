"""Roofline: the search's calibration and scoring per batch against the BF16 floor, one model load.

On a GPU machine (the full-size random 3B, the real tokenizer and COCO captions in .bench_data):
    python bench/roofline.py --size 3b --data .bench_data --work /tmp/roof --out $OUT/roofline.json
    (--profile adds the top CUDA kernels and CPU ops of one calibration and one scoring batch)
On the CPU, on the tiny demo model (keeps the script from rotting; the numbers mean nothing):
    python bench/roofline.py --size tiny --work /tmp/roof-cpu --out /tmp/roof-cpu/roofline.json

One process loads the LM once. On the scheme's own batches (the driver's data code and seed) it
times, per batch: the BF16 forward, and the BF16 forward+backward as ModelOpt's scoring runs it
(the driver's summed loss, gradients only through the embeddings, gradient checkpointing on and
off). Then each search in --searches runs on a fresh copy of the loaded model:
  driver          `autoquant.search`, the package's own search (patches and settings included);
  driver-gc-off   the same with gradient checkpointing off (the driver's --grad-checkpointing off);
  modelopt        bare `mtq.auto_quantize` with the same formats, steps, loss and batches.
A one-batch driver search runs first to warm kernels and the allocator; the BF16 timings skip
--warmup batches. On the GPU every interval is timed with CUDA events. Printed last: the ratios
calibration per batch / BF16 forward and scoring per batch / BF16 forward+backward (same
gradient checkpointing), from the phase totals (as the driver's manifest reports them) and from
the median interval between consecutive batches (the steady state, without per-phase set-up).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import io
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from _common import driver_data  # noqa: E402

from vlm_autoquant.core.interrupt import StopFlag  # noqa: E402
from vlm_autoquant.plan.families import spec_of  # noqa: E402
from vlm_autoquant.search import autoquant  # noqa: E402
from vlm_autoquant.search.spec import SearchCheckpoint, SearchSpec  # noqa: E402

CUDA = torch.cuda.is_available()
SCHEME = "fp8-balanced-10b"  # the default scheme: 16 calibration and 8 scoring batches of 16x512
SEARCHES = ("driver", "driver-gc-off", "modelopt")
# The CPU smoke size: a few small batches per phase.
TINY_SIZES = (
    "--num-calib-samples 256 --num-calib-steps 2 --num-score-steps 2 "
    "--num-eval-samples 0 --seq-len 128 --batch-size 8"
)
Batch = dict[str, torch.Tensor]


def mark() -> object:
    """A point in time on the device's stream (a CUDA event), or the host clock on the CPU."""
    if CUDA:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def between(start: object, end: object) -> float:
    """Seconds from `start` to `end` (two `mark()`s; waits for the GPU to reach `end`)."""
    if CUDA:
        end.synchronize()
        return start.elapsed_time(end) / 1000
    return end - start


def summary(seconds: list[float]) -> dict:
    """Mean and median of per-batch seconds."""
    return {
        "mean_s": statistics.fmean(seconds),
        "median_s": statistics.median(seconds),
        "batches": len(seconds),
    }


def per_batch(step: Callable[[Batch], None], batches: list[Batch], warmup: int) -> dict:
    """`step` on each batch, timed one by one, after `warmup` untimed calls on the first."""
    for _ in range(warmup):
        step(batches[0])
    marks = []
    for b in batches:
        marks.append(mark())
        step(b)
    marks.append(mark())
    return summary([between(a, b) for a, b in zip(marks, marks[1:])])


@contextlib.contextmanager
def as_scored(model: torch.nn.Module, grad_checkpointing: bool) -> Iterator[None]:
    """The model as ModelOpt's HF plugin prepares it for scoring: gradients enabled for the
    embeddings alone (and so the tied lm_head), checkpointed layers in train mode, the rest in
    eval mode; everything restored on exit."""
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)
    if grad_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": True})
        for m in model.modules():  # in module order, as the plugin does: children win
            if hasattr(m, "gradient_checkpointing"):
                m.train()
            else:
                m.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        if grad_checkpointing:
            model.gradient_checkpointing_disable()
        model.eval()
        emb.requires_grad_(False)
        emb.grad = None


def bf16_floors(model: torch.nn.Module, calib: list[Batch], score: list[Batch], warmup: int) -> dict:
    """BF16 forward per calibration batch; forward+backward per scoring batch, checkpointed
    and not; with the driver's own forward and loss."""
    forward_step, loss_func = autoquant.make_steps("gradient")
    emb = model.get_input_embeddings().weight

    def forward(b: Batch) -> None:
        forward_step(model, b)

    def forward_backward(b: Batch) -> None:
        loss_func(forward_step(model, b), b).backward()
        emb.grad = None

    with torch.no_grad():
        out = {"forward": per_batch(forward, calib, warmup)}
    for gc_on, key in ((True, "fwd_bwd_gc_on"), (False, "fwd_bwd_gc_off")):
        with as_scored(model, gc_on):
            out[key] = per_batch(forward_backward, score, warmup)
    return out


class Stopwatch(StopFlag):
    """The stop flag the search reads at the start of every forward: notes when each began and
    whether it scored (gradients on) or calibrated, and tells `on_forward` the same."""

    def __init__(self, on_forward: Callable[[bool], None] | None = None) -> None:
        super().__init__()
        self.marks: list[tuple[bool, object]] = []
        self.on_forward = on_forward

    def raise_if_set(self) -> None:
        scoring = torch.is_grad_enabled()
        if self.on_forward is not None:
            self.on_forward(scoring)
        self.marks.append((scoring, mark()))
        super().raise_if_set()

    def steady(self, scoring: bool) -> float | None:
        """Median seconds between consecutive forwards of one phase (None: fewer than two)."""
        marks = [m for s, m in self.marks if s == scoring]
        gaps = [between(a, b) for a, b in zip(marks, marks[1:])]
        return statistics.median(gaps) if gaps else None


@contextlib.contextmanager
def timing(owner: object, name: str, timings: dict[str, float], key: str) -> Iterator[None]:
    """`owner.name` timed into `timings[key]` (GPU synchronised) for the block; restored after."""
    orig = owner.__dict__[name]
    fn = orig.__func__ if isinstance(orig, staticmethod) else orig

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if CUDA:
                torch.cuda.synchronize()
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, orig)


def modelopt_search(
    model: torch.nn.Module, spec: SearchSpec, batches: list[Batch], bits: float, stop: StopFlag
) -> dict[str, float]:
    """Bare `mtq.auto_quantize` (none of the driver's patches); its phase seconds."""
    import modelopt.torch.quantization as mtq
    import modelopt.torch.quantization.model_quant as mq
    from modelopt.torch.quantization.algorithms import AutoQuantizeGradientSearcher as Grad

    forward_step, loss_func = autoquant.make_steps(spec.method, stop)
    timings: dict[str, float] = {}
    constraints: dict = {"effective_bits": bits}
    if spec.excluded_from_cost:
        constraints["cost"] = {"excluded_module_name_patterns": list(spec.excluded_from_cost)}
    with (
        timing(mq, "calibrate", timings, "calibrate"),
        timing(Grad, "estimate_sensitivity_scores", timings, "score"),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        mtq.auto_quantize(
            model,
            constraints=constraints,
            quantization_formats=list(spec.formats),
            data_loader=batches,
            forward_step=forward_step,
            loss_func=loss_func,
            disabled_layers=list(spec.disabled_layers) or None,
            num_calib_steps=spec.num_calib_steps,
            num_score_steps=spec.num_score_steps,
            method=spec.method,
            verbose=False,
        )
    return timings


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every search of one roofline shares."""

    spec: SearchSpec
    batches: list[Batch]
    bits: float  # the scheme's budget (bare ModelOpt solves it; the driver re-solves later)
    work: Path

    def one_batch(self) -> Setup:
        spec = dataclasses.replace(self.spec, num_calib_steps=1, num_score_steps=1)
        return dataclasses.replace(self, spec=spec, batches=self.batches[:1])


def search(pristine: torch.nn.Module, kind: str, setup: Setup, stop: Stopwatch) -> dict:
    """One search of `kind` on a fresh copy of `pristine`: seconds per batch and peak memory."""
    spec, batches = setup.spec, setup.batches
    model = copy.deepcopy(pristine)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    folder = setup.work / f"search-{kind}-{time.time_ns()}"  # fresh: nothing to resume from
    timings, failed = {}, None
    try:
        if kind == "modelopt":
            timings = modelopt_search(model, spec, batches, setup.bits, stop)
        else:
            timings = autoquant.search(
                model,
                spec,
                batches,
                SearchCheckpoint(folder / "search.pth", lambda *a: ""),
                stop,
                kind != "driver-gc-off",
            ).timings
    except torch.OutOfMemoryError as exc:  # e.g. checkpointing off at full size: a result too
        failed = f"out of GPU memory: {str(exc).splitlines()[0]}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        del model
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0
    if failed:
        print(f"[{kind}] {failed}", flush=True)
        return {"error": failed, "peak_gpu_gib": peak}
    calib_steps, score_steps = (
        min(spec.num_calib_steps, len(batches)),
        min(spec.num_score_steps, len(batches)),
    )
    return {
        "calibrate_s": timings.get("calibrate", 0.0),
        "score_s": timings.get("score", 0.0),
        "calibrate_per_batch_s": timings.get("calibrate", 0.0) / calib_steps,
        "score_per_batch_s": timings.get("score", 0.0) / score_steps,
        "calibrate_steady_s": stop.steady(False),
        "score_steady_s": stop.steady(True),
        "forwards": {"calibrate": sum(not s for s, _ in stop.marks), "score": sum(s for s, _ in stop.marks)},
        "peak_gpu_gib": peak,
    }


# Kernel families for the profile's summary (first match wins, by lower-case substring).
FAMILIES = (
    ("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "matmul", "addmm", "mm")),
    ("attention", ("flash", "fmha", "attention", "efficient")),
    ("fp8 fake-quant casts", ("float8", "e4m3", "fake")),
    ("copy / cast", ("copy", "cast", "convert", "to_copy")),
    ("reduction", ("reduce", "sum", "max", "norm", "amax")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "mul", "add", "pow", "clamp")),
)


class PhaseProfiler:
    """One torch.profiler per phase of a one-batch search: from the phase's first forward to the
    end of ModelOpt's calibration (or scoring) call, so set-up, the solve and saving stay out."""

    def __init__(self) -> None:
        self.events: dict[str, object] = {}
        self.current: tuple[str, torch.profiler.profile] | None = None

    def __call__(self, scoring: bool) -> None:
        phase = "score" if scoring else "calibrate"
        if phase in self.events or (self.current and self.current[0] == phase):
            return
        self.stop()
        acts = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if CUDA else []
        )
        prof = torch.profiler.profile(activities=acts)
        prof.start()
        self.current = (phase, prof)

    def stop(self) -> None:
        if self.current is not None:
            phase, prof = self.current
            if CUDA:
                torch.cuda.synchronize()
            prof.stop()
            self.events[phase] = prof.key_averages()
            self.current = None

    @contextlib.contextmanager
    def ending_phases(self) -> Iterator[None]:
        """Stop the running profile when ModelOpt's calibration or scoring call returns (the
        driver's search wraps these wrappers in its own for the call; restored after)."""
        import modelopt.torch.quantization.model_quant as mq
        from modelopt.torch.quantization.algorithms import AutoQuantizeGradientSearcher as Grad

        def then_stop(fn: Callable) -> Callable:
            def call(*args, **kwargs):
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.stop()

            return call

        score = "estimate_sensitivity_scores"
        saved = [(mq, "calibrate", mq.__dict__["calibrate"]), (Grad, score, Grad.__dict__[score])]
        for owner, name, fn in saved:
            setattr(owner, name, then_stop(fn))
        try:
            yield
        finally:
            for owner, name, fn in saved:
                setattr(owner, name, fn)


def top_rows(events, device: bool, n: int) -> tuple[list[dict], float, int]:
    """The `n` largest self times (device kernels, or host ops), their total and call count."""
    key = "self_device_time_total" if device else "self_cpu_time_total"
    rows = [
        (e.key, (getattr(e, key, 0) or 0) / 1e6, e.count)
        for e in events
        if (getattr(e, key, 0) or 0) > 0 and (not device or getattr(e.device_type, "name", "") == "CUDA")
    ]
    total = sum(t for _, t, _ in rows)
    top = sorted(rows, key=lambda r: -r[1])[:n]
    return (
        [{"name": k[:100], "s": t, "calls": c, "share": t / total if total else 0.0} for k, t, c in top],
        total,
        sum(c for _, _, c in rows),
    )


def families(events) -> dict[str, float]:
    """Device (on the CPU: host) self seconds by kernel family."""
    rows, _, _ = top_rows(events, CUDA, 10**9)
    out: dict[str, float] = {}
    for r in rows:
        low = r["name"].lower()
        label = next((f for f, keys in FAMILIES if any(k in low for k in keys)), "other")
        out[label] = out.get(label, 0.0) + r["s"]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def profile(pristine: torch.nn.Module, setup: Setup, top: int) -> dict:
    """The driver's search on one calibration and one scoring batch under torch.profiler."""
    prof = PhaseProfiler()
    try:
        with prof.ending_phases():
            search(pristine, "driver", setup.one_batch(), Stopwatch(prof))
    finally:
        prof.stop()
    out = {}
    for phase, events in prof.events.items():
        kernels, device_s, launches = top_rows(events, True, top) if CUDA else ([], 0.0, 0)
        ops, host_s, _ = top_rows(events, False, top)
        out[phase] = {
            "device_s": device_s,
            "kernel_launches": launches,
            "host_self_s": host_s,
            "families_s": families(events),
            "top_kernels": kernels,
            "top_host_ops": ops,
        }
    return out


def profile_text(prof: dict) -> str:
    lines = []
    for phase, p in prof.items():
        device = f"device {p['device_s']:.4f} s in {p['kernel_launches']} kernels; " if CUDA else ""
        lines.append(f"\n== one {phase} batch: {device}host self {p['host_self_s']:.4f} s")
        lines.append("families: " + ", ".join(f"{k} {v:.4f} s" for k, v in p["families_s"].items()))
        for title, rows in (
            ("top CUDA kernels", p["top_kernels"]),
            ("top host ops (self CPU)", p["top_host_ops"]),
        ):
            if rows:
                lines.append(f"{title}:{'':<80}{'s':>9}{'calls':>8}{'share':>7}")
                lines += [f"  {r['name']:<94}{r['s']:>9.4f}{r['calls']:>8}{r['share']:>7.1%}" for r in rows]
    return "\n".join(lines)


def checkpoint_and_captions(args: argparse.Namespace) -> tuple[Path, Path]:
    """--ckpt/--captions when given; else the demo (tiny) or a random 3B built under --work."""
    from vlm_autoquant.model.demo import build_checkpoint, build_demo

    if args.size == "tiny" and args.ckpt is None:
        return build_demo(args.work / "demo")
    ckpt = args.ckpt or args.work / "ckpt"
    captions = args.captions or args.data / "coco2017_captions" / "train_sample.txt"
    if not (ckpt / "config.json").exists():
        build_checkpoint(
            ckpt,
            "3b",
            "released",
            seed=0,
            tokenizer=args.data / "qwen2_5_vl_tokenizer",
            device="cuda" if CUDA else "cpu",
        )
    return ckpt, captions


def ratios(floors: dict, searches: dict) -> dict:
    """Each search's calibration / BF16 forward and scoring / BF16 forward+backward."""
    fwd = floors["forward"]["mean_s"]
    out = {}
    for kind, s in searches.items():
        if "error" in s:
            continue
        fb = floors["fwd_bwd_gc_off" if kind == "driver-gc-off" else "fwd_bwd_gc_on"]["mean_s"]
        r = {
            "calibrate_over_bf16_forward": s["calibrate_per_batch_s"] / fwd,
            "score_over_bf16_fwd_bwd": s["score_per_batch_s"] / fb,
        }
        if s["calibrate_steady_s"] is not None:
            r["calibrate_steady_over_bf16_forward"] = s["calibrate_steady_s"] / fwd
        if s["score_steady_s"] is not None:
            r["score_steady_over_bf16_fwd_bwd"] = s["score_steady_s"] / fb
        out[kind] = r
    return out


def table(result: dict) -> list[tuple[str, str]]:
    """The printed table: per-batch seconds, then the ratios."""
    f = result["bf16"]
    rows = [
        ("batch (rows x tokens)", "x".join(map(str, result["batch_shape"]))),
        ("BF16 forward per batch (s)", f"{f['forward']['mean_s']:.4f}"),
        ("BF16 fwd+bwd per batch, grad ckpt on (s)", f"{f['fwd_bwd_gc_on']['mean_s']:.4f}"),
        ("BF16 fwd+bwd per batch, grad ckpt off (s)", f"{f['fwd_bwd_gc_off']['mean_s']:.4f}"),
    ]
    for kind, s in result["searches"].items():
        if "error" in s:
            rows.append((f"{kind}: failed", s["error"][:60]))
            continue
        rows += [
            (f"{kind}: calibration per batch (s)", f"{s['calibrate_per_batch_s']:.4f}"),
            (f"{kind}: scoring per batch (s)", f"{s['score_per_batch_s']:.4f}"),
            (f"{kind}: peak GPU memory (GiB)", f"{s['peak_gpu_gib']:.1f}"),
        ]
    return rows + [
        (f"{kind}: {k.replace('_', ' ')}", f"{v:.2f}")
        for kind, r in result["ratios"].items()
        for k, v in r.items()
    ]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["3b", "tiny"], default="3b")
    p.add_argument(
        "--data",
        type=Path,
        default=ROOT / ".bench_data",
        help="folder with qwen2_5_vl_tokenizer/ and coco2017_captions/train_sample.txt",
    )
    p.add_argument("--ckpt", type=Path, default=None, help="an existing checkpoint to use")
    p.add_argument("--captions", type=Path, default=None, help="caption file (default: --data's)")
    p.add_argument("--work", type=Path, default=Path("/tmp/roof"))
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    p.add_argument("--scheme", default=SCHEME, help="a gradient-method catalog scheme")
    p.add_argument(
        "--sizes",
        default=None,
        help=f"the driver's override flags as one string (default: the scheme's own; tiny: {TINY_SIZES!r})",
    )
    p.add_argument(
        "--searches", default="driver,driver-gc-off,modelopt", help=f"comma list of {', '.join(SEARCHES)}"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed BF16 batches before each floor")
    p.add_argument(
        "--fp8-kernel",
        choices=["auto", "eager", "cuda-ext"],
        default="auto",
        help="ModelOpt's FP8 kernel, chosen as the driver chooses it",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile one calibration and one "
        "scoring batch of the driver's search (written next to --out)",
    )
    p.add_argument("--top", type=int, default=12, help="rows per profile table")
    args = p.parse_args()
    args.searches = args.searches.split(",")
    bad = [s for s in args.searches if s not in SEARCHES]
    if bad:
        p.error(f"--searches: unknown {bad}; choose from {', '.join(SEARCHES)}")
    from vlm_autoquant.plan.schemes import default_catalog, load_catalog

    catalog = load_catalog(default_catalog())
    gradient = [n for n, s in catalog.items() if s.method == "gradient"]
    if args.scheme not in gradient:
        p.error(
            f"--scheme {args.scheme}: choose a gradient-method scheme ({', '.join(gradient)});"
            " the roofline compares scoring with a BF16 forward+backward"
        )
    if args.sizes is None:
        args.sizes = TINY_SIZES if args.size == "tiny" else ""
    return args


def machine() -> dict:
    from importlib import metadata

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": metadata.version("transformers"),
        "modelopt": metadata.version("nvidia-modelopt"),
        "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
    }


def measure(args: argparse.Namespace, ckpt: Path, captions: Path) -> dict:
    """Load once; the BF16 floors, the warm-up search, then each search in --searches."""
    from vlm_autoquant.model.lm import load_lm, pick_device, text_config
    from vlm_autoquant.search.fp8_kernel import select_fp8_kernel

    scheme, data = driver_data(ckpt, captions, args.scheme, args.sizes.split())
    spec = spec_of([scheme])
    device = pick_device()
    batches = [{k: v.to(device) for k, v in b.items()} for b in data.calib.batches[: data.steps]]
    result = {
        "machine": machine(),
        "scheme": scheme.name,
        "checkpoint": str(ckpt),
        "fp8_kernel": select_fp8_kernel(args.fp8_kernel),
        "batch_shape": list(batches[0]["input_ids"].shape),
        "steps": {
            "calibrate": min(spec.num_calib_steps, len(batches)),
            "score": min(spec.num_score_steps, len(batches)),
        },
    }
    t0 = time.perf_counter()
    model = load_lm(ckpt, text_config(ckpt), device)
    result["load_s"] = time.perf_counter() - t0
    calib = batches[: result["steps"]["calibrate"]]
    result["bf16"] = bf16_floors(model, calib, batches[: result["steps"]["score"]], args.warmup)
    setup = Setup(spec, batches, scheme.effective_bits, args.work)
    search(model, "driver", setup.one_batch(), Stopwatch())  # warm-up: kernels, allocator
    result["searches"] = {kind: search(model, kind, setup, Stopwatch()) for kind in args.searches}
    result["ratios"] = ratios(result["bf16"], result["searches"])
    if args.profile:
        result["profile"] = profile(model, setup, args.top)
    return result


def main() -> None:
    args = parse()
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt, captions = checkpoint_and_captions(args)
    result = measure(args, ckpt, captions)
    result["table"] = rows = table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if "profile" in result:
        text = profile_text(result["profile"])
        args.out.with_name(args.out.stem + "-profile.txt").write_text(text + "\n")
        print(text)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    width = max(len(a) for a, _ in rows)
    print(f"\n{result['machine']['device']}, {result['scheme']}, FP8 kernel {result['fp8_kernel']}")
    for a, v in rows:
        print(f"{a:<{width}}  {v:>10}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
