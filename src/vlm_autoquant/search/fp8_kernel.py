"""ModelOpt's FP8 fake-quant kernel: eager PyTorch, or its CUDA extension when that loads as built.

A cached extension build counts only when torch would load it without compiling: after ModelOpt,
torch or CUDA changed, torch's JIT loader silently rebuilds (about 56 s), so `auto` then takes
the eager path and says why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from modelopt.torch.quantization import extensions, tensor_quant
from torch.utils import cpp_extension as ce
from torch.utils.cpp_extension import LIB_EXT, _get_build_directory

log = logging.getLogger(__name__)

EXT_NAME = "modelopt_cuda_ext_fp8"


def cached_build_state(build_dir: Path, name: str, expected_ninja: str | None) -> tuple[bool, str]:
    """Whether torch would load `name` from `build_dir` without compiling, and why not.

    torch's `cpp_extension.load` in a fresh process (its version hash lives only in memory)
    rewrites `build.ninja` (`_maybe_write`: untouched when equal) and runs `ninja`, which
    rebuilds when the library is missing, the build file's commands changed, or a source or
    header recorded in the dependency log is newer. So: the library exists, `build.ninja` is
    what torch would write now (`expected_ninja`; None skips that check), and a dry run
    (`ninja -n`, nothing is built) finds no work to do.
    """
    if not (build_dir / f"{name}{LIB_EXT}").is_file():
        return False, f"no build of {name} in {build_dir}"
    ninja_file = build_dir / "build.ninja"
    if not ninja_file.is_file():
        return False, f"{ninja_file} is missing"
    if expected_ninja is not None and ninja_file.read_text() != expected_ninja:
        return False, (
            f"{ninja_file} differs from what torch would write now (ModelOpt's "
            "sources or flags, torch, CUDA or TORCH_CUDA_ARCH_LIST changed)"
        )
    ninja = shutil.which("ninja")
    if ninja is None:
        return False, "ninja is not installed, so torch cannot check or load the build"
    try:
        out = subprocess.run(
            [ninja, "-n", "-d", "explain"], cwd=build_dir, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"ninja's dry run failed: {exc}"
    text = (out.stdout + out.stderr).strip()
    if out.returncode == 0 and "no work to do" in text:
        return True, f"cached build in {build_dir} is up to date"
    why = [ln.removeprefix("ninja explain: ") for ln in text.splitlines() if "explain" in ln]
    return False, "ninja would rebuild it: " + ("; ".join(why[:3]) or text[-300:])


def _modelopt_fp8_load_call() -> tuple[str, list[str], dict]:
    """The (name, sources, kwargs) ModelOpt passes to load_cpp_extension, captured, not run."""
    seen: dict = {}

    def record(
        name, sources, cuda_version_specifiers=None, fail_msg="", raise_if_failed=False, **load_kwargs
    ):
        seen.update(name=name, sources=[str(s) for s in sources], kwargs=load_kwargs)

    orig = extensions.load_cpp_extension
    had = hasattr(extensions.get_cuda_ext_fp8, "extension")
    extensions.load_cpp_extension = record
    try:
        if not had:
            extensions.get_cuda_ext_fp8()
    finally:
        extensions.load_cpp_extension = orig
        if not had:
            extensions.get_cuda_ext_fp8.__dict__.pop("extension", None)
    if not seen:
        raise RuntimeError("ModelOpt's FP8 extension is already resolved in this process")
    return seen["name"], seen["sources"], seen["kwargs"]


def _torch_ninja_file(name: str, sources: list[str], kwargs: dict) -> str:
    """The build.ninja torch's JIT load would write for ModelOpt's call (written to a temp dir)."""
    with_cuda = any(map(ce._is_cuda_file, sources))
    arch_set = "TORCH_CUDA_ARCH_LIST" in os.environ
    if not arch_set:  # ModelOpt sets it from the device before loading
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "build.ninja")
            ce._write_ninja_file_to_build_library(
                path=path,
                name=name,
                sources=sources,
                extra_cflags=kwargs.get("extra_cflags") or [],
                extra_cuda_cflags=kwargs.get("extra_cuda_cflags") or [],
                extra_sycl_cflags=kwargs.get("extra_sycl_cflags") or [],
                extra_ldflags=ce._prepare_ldflags(
                    kwargs.get("extra_ldflags") or [], with_cuda, False, False, False
                ),
                extra_include_paths=kwargs.get("extra_include_paths") or [],
                with_cuda=with_cuda,
                with_sycl=False,
                is_standalone=False,
            )
            return Path(path).read_text()
    finally:
        if not arch_set:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)


def fp8_extension_state() -> tuple[bool, str]:
    """Whether ModelOpt's FP8 CUDA extension loads here without a build, and the reason."""
    if getattr(extensions.get_cuda_ext_fp8, "extension", None) is not None:
        return True, "already loaded in this process"
    try:
        name, sources, kwargs = _modelopt_fp8_load_call()
        build_dir = Path(_get_build_directory(name, verbose=False))
        expected = _torch_ninja_file(name, sources, kwargs)
    except Exception as exc:  # noqa: BLE001 - private torch/ModelOpt helpers: say why, use eager
        return False, f"cannot check the cached build ({type(exc).__name__}: {exc})"
    return cached_build_state(build_dir, name, expected)


def select_fp8_kernel(kind: str) -> str:
    """Choose ModelOpt's FP8 fake-quant kernel and return what will actually run.

    "eager": ModelOpt's PyTorch path (no build). "cuda-ext": ModelOpt's CUDA extension, JIT-built
    on first use (about 45 s on an H200 machine, cached under TORCH_EXTENSIONS_DIR), ~15% faster
    per scoring batch. "auto" (the default): the extension when its cached build would load
    without compiling (`fp8_extension_state`), else eager with the reason logged, so no run pays
    a silent build, not even after ModelOpt or torch was reinstalled (docs/PERFORMANCE.md).
    """
    if not torch.cuda.is_available():
        return "eager (CPU)"
    cached, why = fp8_extension_state()
    if kind == "auto":
        kind = "cuda-ext" if cached else "eager"
        if kind == "eager":
            log.info(
                "FP8 kernel: eager (ModelOpt's CUDA extension would need a build: %s; "
                "build it once with --fp8-kernel cuda-ext, ~45 s, for ~15%% faster "
                "scoring later)",
                why,
            )
    if kind == "eager":
        extensions.get_cuda_ext_fp8.extension = None  # ModelOpt then takes its eager path
        return "eager"
    if cached:
        log.info("FP8 kernel: ModelOpt's CUDA extension (%s)", why)
    else:
        log.info(
            "FP8 kernel: ModelOpt's CUDA extension, building it now (%s): a one-time step "
            "of about 45 s, cached for later runs",
            why,
        )
    t0 = time.perf_counter()
    extensions.get_cuda_ext_fp8(raise_if_failed=True)
    log.info("FP8 CUDA extension ready in %.1f s", time.perf_counter() - t0)
    return "cuda-ext"


# ModelOpt 0.47's two FP8 fake-quant kernels compute the multiplier 448 / amax differently:
# its CUDA extension divides once (C++ `448.f / amax` is `fill_(448).div_(amax)`), its eager
# path writes `448.0 / amax` in Python, which torch evaluates as `amax.reciprocal() * 448`, two
# roundings. They differ in the last fp32 bit for about a quarter of all amax values, and so
# break some E4M3 rounding ties differently. The export reproduces the run's own arithmetic.
FP8_MAX = 448.0
_EPS = 1.0 / (1 << 24)  # both kernels treat amax <= 2^-24 as 1


def divides(run_kernel: str | None, amax: torch.Tensor | None) -> bool:
    """Whether the run's fake quant of a tensor with this amax divided once: ModelOpt's CUDA
    extension, which `tensor_quant.scaled_e4m3_impl` uses for a per-tensor or per-axis amax
    (a per-token amax of a batch takes the eager path even with the extension)."""
    return run_kernel == "cuda-ext" and amax is not None and amax.squeeze().ndim <= 1


def fake_quant_scale(amax: torch.Tensor, division: bool = False) -> torch.Tensor:
    """ModelOpt's FP8 fake-quant multiplier 448 / amax in fp32, with its guard for an all-zero
    tensor: one correctly rounded division (`division`, the CUDA extension) or, as its eager path
    computes it, reciprocal(amax) x 448."""
    amax = amax.float()
    safe = torch.where(amax <= _EPS, torch.ones_like(amax), amax)
    return torch.full_like(safe, FP8_MAX) / safe if division else FP8_MAX / safe


def e4m3_codes(x: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """x in fp32 times `multiplier`, clamped to E4M3's range, cast (round to nearest even)."""
    return (x.float() * multiplier).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fake_quant(x: torch.Tensor, amax: torch.Tensor, division: bool = False) -> torch.Tensor:
    """ModelOpt's FP8 fake quant: x * (448 / amax) rounded to E4M3 (saturating), times
    1 / (448 / amax), back in x's dtype; `division` as in `fake_quant_scale`. `amax` broadcasts
    against x (per tensor, per token)."""
    scale = fake_quant_scale(amax.to(x.device), division)
    return (e4m3_codes(x, scale).float() * (1 / scale)).to(x.dtype)


def weight_codes(weight: torch.Tensor, amax: torch.Tensor, division: bool = False) -> torch.Tensor:
    """The E4M3 codes ModelOpt's fake quant rounds a 2-D weight to, for a per-tensor or
    per-output-channel amax."""
    scale = fake_quant_scale(amax.to(weight.device), division)
    return e4m3_codes(weight, scale.reshape(-1, 1) if scale.numel() > 1 else scale)


@contextlib.contextmanager
def run_arithmetic(run_kernel: str | None) -> Iterator[str]:
    """Run ModelOpt's FP8 fake quant in this block in the arithmetic the run used.

    A run on the CUDA extension is reproduced by the extension itself when its cached build
    loads here, else (a CPU, or no build) by the extension's arithmetic written in PyTorch for the
    tensors the extension handled; any other run uses ModelOpt's eager path. Returns what runs.
    """
    if run_kernel == "cuda-ext" and torch.cuda.is_available() and fp8_extension_state()[0]:
        extensions.get_cuda_ext_fp8(raise_if_failed=True)
        yield "cuda-ext"
        return
    had = hasattr(extensions.get_cuda_ext_fp8, "extension")
    saved_ext = getattr(extensions.get_cuda_ext_fp8, "extension", None)
    saved_impl = tensor_quant.scaled_e4m3_impl
    extensions.get_cuda_ext_fp8.extension = None  # ModelOpt's eager path
    if run_kernel == "cuda-ext":

        def impl(inputs, amax=None):
            if divides(run_kernel, amax):
                return fake_quant(inputs, amax, division=True)
            return saved_impl(inputs, amax)

        tensor_quant.scaled_e4m3_impl = impl
    try:
        yield "cuda-ext arithmetic (PyTorch)" if run_kernel == "cuda-ext" else "eager"
    finally:
        tensor_quant.scaled_e4m3_impl = saved_impl
        if had:
            extensions.get_cuda_ext_fp8.extension = saved_ext
        else:
            del extensions.get_cuda_ext_fp8.extension
