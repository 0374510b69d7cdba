"""`--fp8-kernel auto` uses ModelOpt's cached CUDA extension only when torch would not rebuild it.

A fake build directory with a real ninja file stands in for torch's extension cache: the check
is torch's own decision (same build.ninja, then ninja's dry run), so no CUDA is needed.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from modelopt.torch.quantization import extensions

from vlm_autoquant.search import fp8_kernel

NAME = "fake_ext"
NINJA = f"""rule cp
  command = cp $in $out
build {NAME}.so: cp src.cu
default {NAME}.so
"""

needs_ninja = pytest.mark.skipif(
    shutil.which("ninja") is None, reason="ninja is not installed (torch needs it to build too)"
)


@pytest.fixture
def build_dir(tmp_path) -> Path:
    """A build directory as torch leaves it after a successful build."""
    (tmp_path / "src.cu").write_text("// kernel v1\n")
    (tmp_path / "build.ninja").write_text(NINJA)
    if shutil.which("ninja"):
        subprocess.run(["ninja"], cwd=tmp_path, check=True, capture_output=True)
    return tmp_path


@needs_ninja
def test_fresh_build_is_used(build_dir):
    ok, why = fp8_kernel.cached_build_state(build_dir, NAME, NINJA)
    assert ok, why


@needs_ninja
def test_reinstalled_source_newer_than_the_build_is_stale(build_dir):
    src = build_dir / "src.cu"
    later = (build_dir / f"{NAME}.so").stat().st_mtime + 60
    os.utime(src, (later, later))  # what a reinstall does: same path, new file
    ok, why = fp8_kernel.cached_build_state(build_dir, NAME, NINJA)
    assert not ok and "rebuild" in why and "src.cu" in why


@needs_ninja
def test_changed_build_file_is_stale(build_dir):
    ok, why = fp8_kernel.cached_build_state(build_dir, NAME, NINJA.replace("cp $in", "cp -p $in"))
    assert not ok and "build.ninja" in why


def test_missing_library_or_build_file_is_not_a_cache(build_dir):
    (build_dir / "build.ninja").unlink()
    assert not fp8_kernel.cached_build_state(build_dir, NAME, None)[0]
    (build_dir / f"{NAME}.so").unlink()
    ok, why = fp8_kernel.cached_build_state(build_dir, NAME, None)
    assert not ok and "no build" in why


def test_modelopt_call_is_captured_without_loading():
    had = hasattr(extensions.get_cuda_ext_fp8, "extension")
    name, sources, _ = fp8_kernel._modelopt_fp8_load_call()
    assert name == fp8_kernel.EXT_NAME
    assert sources and all(Path(s).is_file() and s.endswith(".cu") for s in sources)
    assert hasattr(extensions.get_cuda_ext_fp8, "extension") == had


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only failure path")
def test_state_fails_closed_with_a_reason_without_cuda():
    ok, why = fp8_kernel.fp8_extension_state()
    assert not ok and why


@pytest.mark.parametrize("cached", [True, False])
def test_auto_uses_the_extension_only_when_torch_would_not_rebuild(monkeypatch, caplog, cached):
    loads = []

    def fake_load(raise_if_failed=False):
        loads.append(raise_if_failed)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(extensions, "get_cuda_ext_fp8", fake_load)
    monkeypatch.setattr(fp8_kernel, "fp8_extension_state", lambda: (cached, "REASON-X"))
    with caplog.at_level(logging.INFO, logger=fp8_kernel.__name__):
        kind = fp8_kernel.select_fp8_kernel("auto")
    assert kind == ("cuda-ext" if cached else "eager")
    assert bool(loads) == cached  # eager never builds
    assert "REASON-X" in caplog.text


def test_explicit_cuda_ext_says_when_it_builds(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(extensions, "get_cuda_ext_fp8", lambda raise_if_failed=False: None)
    monkeypatch.setattr(fp8_kernel, "fp8_extension_state", lambda: (False, "ninja would rebuild it: X"))
    with caplog.at_level(logging.INFO, logger=fp8_kernel.__name__):
        assert fp8_kernel.select_fp8_kernel("cuda-ext") == "cuda-ext"
    assert "building it now (ninja would rebuild it: X)" in caplog.text
    assert "cached build" not in caplog.text


def test_expected_build_file_is_torchs_for_modelopts_source_and_stable(monkeypatch):
    """The comparison must not call every build stale: same inputs, same file; env restored."""
    from torch.utils import cpp_extension as ce

    monkeypatch.setattr(ce, "CUDA_HOME", "/opt/fake-cuda")  # no CUDA toolkit on this machine
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    name, sources, kwargs = fp8_kernel._modelopt_fp8_load_call()
    first = fp8_kernel._torch_ninja_file(name, sources, kwargs)
    assert first == fp8_kernel._torch_ninja_file(name, sources, kwargs)
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ
    assert f"build {name}.so: link" in first and all(s in first for s in sources)


def _division_matters() -> tuple[torch.Tensor, torch.Tensor]:
    """An amax whose 448 / amax differs between one division and reciprocal x 448, and bf16
    inputs on which the two round to different E4M3 codes."""
    for a in (torch.arange(1, 4000) / 256).to(torch.bfloat16).float():
        div, rec = fp8_kernel.fake_quant_scale(a, True), fp8_kernel.fake_quant_scale(a, False)
        if div == rec:
            continue
        x = (torch.linspace(-1, 1, 20001) * a).to(torch.bfloat16)
        c_div = (x.float() * div).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
        c_rec = (x.float() * rec).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
        if (c_div != c_rec).any():
            return a.reshape(()), x
    raise AssertionError("no amax separates the two arithmetics")


def test_run_arithmetic_reproduces_the_cuda_extension_on_the_cpu(monkeypatch):
    """A run on ModelOpt's CUDA extension (one division for 448 / amax) is reproduced on a
    machine without it: inside run_arithmetic("cuda-ext") ModelOpt's own TensorQuantizer rounds
    as the extension does, which differs from its eager path for this amax; per-token amax keeps
    the eager path, as ModelOpt's dispatch does; everything is restored on exit."""
    from modelopt.torch.quantization import tensor_quant
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.tensor_quant import fp8_eager

    from vlm_autoquant.exporter.verify import _input_quant_hook

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without the GPU
    amax, x = _division_matters()
    q = TensorQuantizer(QuantizerAttributeConfig(num_bits=(4, 3)), amax=amax)
    eager = q(x)
    assert torch.equal(eager, fp8_eager(x, amax))
    impl = tensor_quant.scaled_e4m3_impl
    with fp8_kernel.run_arithmetic("cuda-ext") as what:
        ext = q(x)
        per_token = x[:20000].reshape(2, 2, 5000)
        tok_amax = per_token.abs().amax(-1, keepdim=True).float()
        assert torch.equal(tensor_quant.scaled_e4m3_impl(per_token, tok_amax), fp8_eager(per_token, tok_amax))
    assert what.startswith("cuda-ext") and tensor_quant.scaled_e4m3_impl is impl
    assert not torch.equal(ext, eager)
    assert torch.equal(ext, fp8_kernel.fake_quant(x, amax, division=True))
    # the verifier's emulation and the exporter's codes follow the run's kernel
    for run_kernel, want in (("cuda-ext", ext), ("eager", eager)):
        hook = _input_quant_hook(amax / 448, "modelopt", amax, run_kernel)
        assert torch.equal(hook(None, (x,))[0], want), run_kernel
    codes = fp8_kernel.weight_codes(x.reshape(1, -1), amax, fp8_kernel.divides("cuda-ext", amax)).float()
    assert torch.equal(
        (codes * (1 / fp8_kernel.fake_quant_scale(amax, True))).to(x.dtype), ext.reshape(1, -1)
    )
    with fp8_kernel.run_arithmetic("eager") as what:
        assert what == "eager" and torch.equal(q(x), eager)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (ModelOpt's CUDA extension); run on the H200: see docs/PERFORMANCE.md",
)
def test_cuda_extension_divides_once():
    """On a GPU: ModelOpt's CUDA extension is exactly `fake_quant(division=True)` (one
    division for 448 / amax), per tensor and per output channel, and not its eager path for
    this amax."""
    from modelopt.torch.quantization.tensor_quant import fp8_eager

    ext = extensions.get_cuda_ext_fp8(raise_if_failed=True)
    amax, x = _division_matters()
    amax, x = amax.cuda(), x.cuda()
    got = ext.fake_e4m3fy(x, amax)
    assert torch.equal(got, fp8_kernel.fake_quant(x, amax, division=True))
    assert not torch.equal(got, fp8_eager(x, amax))
    w = x[:20000].reshape(8, 2500)
    per_channel = (
        torch.full((8, 1), amax.item(), device="cuda") * torch.linspace(0.5, 1, 8, device="cuda")[:, None]
    )
    got = ext.fake_e4m3fy_with_axis(w, per_channel.squeeze(), 0)
    assert torch.equal(got, fp8_kernel.fake_quant(w, per_channel, division=True))
