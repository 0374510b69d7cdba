"""Validate every input of a run before any weight is loaded, and report all problems together.

Cheap checks come first (dependencies by metadata, catalog and scheme, paths, the checkpoint's
files and headers, the caption file, the output dir, tracking); only when they all pass are
transformers imported to read the config and the tokenizer, so a bad input is refused in
seconds, before anything heavy is imported.
"""

from __future__ import annotations

import logging
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .. import tracking
from ..core import paths
from ..core.artifacts import MANIFEST_FILE, check_output_dir
from ..core.errors import Problems, UsageError
from ..core.hmac_key import check_key_file
from ..core.timing import part
from . import cost

if TYPE_CHECKING:
    from ..model.checkpoint import CheckpointInfo
    from .calib_data import CaptionFile
from ..model import prefetch
from ..model.checkpoint import (
    check_config_sizes,
    check_lm_tensors,
    inspect_checkpoint,
    linear_numels_from_headers,
)
from .inputs import Inputs, RunOptions
from .schemes import FORMAT_BITS, Scheme, default_catalog, load_catalog, resolve

log = logging.getLogger(__name__)


# Keep in step with pyproject.toml.
REQUIRED = {
    "torch": ">=2.6,<2.15",
    "transformers": ">=5.14.1,<5.18",
    "nvidia-modelopt": ">=0.47.0,<0.48",
    "datasets": ">=5.0,<6",
    "mlflow": ">=3.13,<3.18",
    # device_map loading (transformers) and the GPU placement (placement.py).
    "accelerate": ">=1.0",
    # the compressed-tensors export (exporter/ct.py) and transformers' loader of it.
    "compressed-tensors": ">=0.20,<0.21",
}


# A distribution that provides the same importable package.
ALTERNATIVES = {"mlflow": ("mlflow-skinny",)}


def installed_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in REQUIRED:
        out[name] = None
        for dist in (name, *ALTERNATIVES.get(name, ())):
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def versions() -> dict[str, str | None]:
    """Python, torch, CUDA, device and the installed versions of the libraries that matter."""
    import torch  # torch: this module is imported on the refusal path

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    for name in ("transformers", "nvidia-modelopt", "datasets", "mlflow", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def require_dependencies() -> None:
    """Raise one UsageError listing every missing or out-of-range dependency."""
    problems = Problems()
    check_dependencies(problems)
    problems.raise_if_any()


def check_dependencies(problems: Problems, versions: dict[str, str | None] | None = None) -> None:
    """Add a problem for each missing or out-of-range dependency, with the install command."""
    versions = installed_versions() if versions is None else versions
    for name, spec in REQUIRED.items():
        found = versions.get(name)
        install = f"pip install '{name}{spec}'"
        if name == "torch":
            install = "pip install torch==2.13.0 (or any torch" + spec + ")"
        if found is None:
            problems.add(f"dependency {name}", "is not installed", install)
        elif Version(Version(found).base_version) not in SpecifierSet(spec):
            problems.add(f"dependency {name}", f"version {found} is outside {spec}", install)


# The CLI contract's default caption file, relative to the working directory (the project root
# under `mlflow run .`).
DEFAULT_CALIB_FILE = Path("datasets/vlm-quantize-calib/coco2017_captions.txt")


def calib_path(given: Path | None) -> Path:
    return given if given is not None else DEFAULT_CALIB_FILE


def check_bits(scheme: Scheme, numels: dict[str, int], problems: Problems, flag: str) -> None:
    """The target must lie in the range the scheme's formats and exclusions allow."""
    rng = cost.bits_range(
        numels, scheme.disabled_layers, scheme.excluded_from_cost, min(FORMAT_BITS[f] for f in scheme.formats)
    )
    if rng.counted_weights == 0:
        problems.add(
            f"scheme {scheme.name}",
            "cost_excluded_layers exclude every LM linear",
            "exclude fewer layers so that the effective-bits budget has a denominator",
        )
    elif not rng.contains(scheme.effective_bits):
        problems.add(
            flag,
            f"{scheme.effective_bits:g} effective bits is not achievable for "
            f"scheme {scheme.name}: the achievable range is {rng}",
            f"pass a value in {rng} (the low end puts every searched layer in FP8)",
        )


def gather(
    options: RunOptions,
    scheme_names: list[str],
    overrides: dict,
    problems: Problems,
    flags: dict[str, str] | None = None,
    finished_marker: str = MANIFEST_FILE,
) -> Inputs | None:
    """Check dependencies, catalog, scheme(s), checkpoint, data file, output dir and tracking.

    Adds every problem found to `problems`; returns Inputs only when nothing is wrong.
    """
    with tracking.store_building() as store:  # a new store migrates in a child while we check
        with part("torch"):
            from .calib_data import check_caption_file  # torch: not on the refusal path

        schemes = check_schemes(options.catalog, scheme_names, overrides, flags, problems)
        info = (
            inspect_checkpoint(options.model_dir, problems)
            if paths.probe(options.model_dir, "--model-dir", problems, "dir")
            else None
        )
        calib = calib_path(options.calib_file)
        caption_file = (
            check_caption_file(calib, problems)
            if paths.probe(calib, "--calib-file", problems, "file")
            else None
        )
        check_output_dir(
            options.output_dir, problems, finished_marker, options.overwrite, model_dir=options.model_dir
        )
        tracking.check_reachable(problems, options.experiment)
        check_key_file(problems)
        check_gpu_flags(options.gpus, options.max_gpu_memory, problems)
        if info is not None:  # the budget's range from the headers' shapes: still no transformers
            _check_budgets(schemes, linear_numels_from_headers(info), problems)
        if problems or info is None or caption_file is None:
            return None  # refused before transformers is even imported
        prefetch.start(options.model_dir)  # the weights read while transformers and ModelOpt import
        return _gather_model(options, schemes, info, caption_file, problems, store)


def _gather_model(
    options: RunOptions,
    schemes: list[Scheme],
    info: "CheckpointInfo",
    caption_file: "CaptionFile",
    problems: Problems,
    store: tracking.StoreBuild,
) -> Inputs | None:
    """The checks that import transformers: the config against the weights, the tokenizer; then
    the new SQLite store is put in place, whole, before any weight is loaded."""
    from .calib_data import load_captions  # torch: not on the refusal path

    with part("transformers and config"):
        text_cfg, numels = read_text_config(options.model_dir, info, problems)
    _check_budgets(schemes, numels or {}, problems)
    if problems or text_cfg is None:
        return None
    with part("tokenizer"):
        tokenizer = load_tokenizer(options.model_dir, problems)
    if tokenizer is None:
        return None
    with part("store"):
        store.finish(problems)
    if problems:
        return None
    with part("captions"):
        captions = load_captions(caption_file.path)
    return Inputs(options, schemes, info, text_cfg, numels, caption_file, tokenizer, captions)


_GPU_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(GiB|GB|MiB|MB)?\s*$", re.IGNORECASE)


def check_gpu_flags(gpus: str | None, max_memory: str | None, problems: Problems) -> None:
    """--gpus and --max-gpu-memory by their syntax alone, on every machine (a CPU one too):
    GPU indices once each, sizes positive (placement.py checks them against the GPUs)."""
    if gpus is not None and gpus.strip() and gpus.strip().lower() != "all":
        ids = [x.strip() for x in gpus.split(",")]
        if not all(x.isdigit() for x in ids) or len(set(map(int, filter(str.isdigit, ids)))) != len(ids):
            problems.add(
                "--gpus", f"{gpus!r} is not a list of distinct GPU indices", "e.g. --gpus 0,1, or --gpus all"
            )
    if max_memory is not None and max_memory.strip():
        sizes = [_GPU_SIZE.match(x) for x in max_memory.split(",")]
        if not all(m and float(m.group(1)) > 0 for m in sizes):
            problems.add(
                "--max-gpu-memory",
                f"{max_memory!r} is not one positive size or one per GPU",
                "e.g. --max-gpu-memory 120GiB, or 120GiB,100GiB",
            )


def _check_budgets(schemes: list[Scheme], numels: dict[str, int], problems: Problems) -> None:
    for s in schemes if numels else []:
        flag = "--effective-bits" if "effective_bits" in s.overrides else f"scheme {s.name}.effective_bits"
        if not any(p.input == flag for p in problems.items):
            check_bits(s, numels, problems, flag)


def check_schemes(
    catalog_file: Path | None,
    names: list[str],
    overrides: dict,
    flags: dict[str, str] | None,
    problems: Problems,
) -> list[Scheme]:
    """Load the catalog and resolve each named scheme with the CLI overrides."""
    schemes: list[Scheme] = []
    if catalog_file is not None and not paths.probe(catalog_file, "--catalog", problems, "file"):
        return schemes
    try:
        catalog = load_catalog(catalog_file or default_catalog())
        for name in names:
            schemes.append(resolve(catalog, name, overrides, flags))
    except UsageError as exc:
        problems.extend(exc.problems)
    return schemes


def read_text_config(
    model_dir: Path, info: "CheckpointInfo", problems: Problems
) -> tuple[object, dict[str, int] | None]:
    """The LM's config and the weight count of each linear (meta device, no weights); every LM
    tensor in the files must be named and shaped as the config's architecture says."""
    from ..model.lm import linear_numels, meta_model, text_config  # transformers: after the cheap checks

    try:
        cfg = text_config(model_dir)
        sizes = {
            k: getattr(cfg, k, None)
            for k in ("num_hidden_layers", "hidden_size", "vocab_size", "intermediate_size")
        }
        if not check_config_sizes(info, sizes, problems):
            return None, None  # no module is built for sizes the weights do not have
        meta = meta_model(cfg)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad config
        problems.add(
            "--model-dir",
            f"config.json cannot be read as Qwen2.5-VL ({type(exc).__name__}: {str(exc)[:300]})",
            "restore the checkpoint's original config.json",
        )
        return None, None
    check_lm_tensors(
        info,
        {k: tuple(v.shape) for k, v in meta.state_dict().items()},
        bool(cfg.tie_word_embeddings),
        problems,
    )
    return cfg, linear_numels(meta)


def load_tokenizer(model_dir: Path, problems: Problems):
    from transformers import AutoTokenizer  # transformers: imported only when this runs, off the refusal path

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        problems.add(
            "--model-dir",
            f"the tokenizer cannot be loaded ({exc})",
            "copy tokenizer.json and tokenizer_config.json from the original checkpoint",
        )
        return None
