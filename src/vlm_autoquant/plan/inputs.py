"""The inputs of a run: what the user asked for (RunOptions) and what validation found (Inputs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .schemes import Scheme

if TYPE_CHECKING:
    from ..model.checkpoint import CheckpointInfo
    from .calib_data import CaptionFile

# Scheme fields a command line may override, and the contract's flag where it is not --<field>.
NOT_OVERRIDABLE = ("name", "description", "formats", "disabled_layers", "cost_excluded_layers", "overrides")
FLAG_NAMES = {"method": "--auto-quantize-method"}
OVERRIDE_FLAGS = {
    f: FLAG_NAMES.get(f, "--" + f.replace("_", "-")) for f in Scheme.model_fields if f not in NOT_OVERRIDABLE
}


@dataclass
class RunOptions:
    """Everything the CLI passes that is not a scheme field."""

    model_dir: Path
    output_dir: Path
    calib_file: Path | None = None
    catalog: Path | None = None
    overwrite: bool = False
    save_weights: bool = False
    # None (auto): off where the memory plan fits the batch without it, else on (and on where
    # there is no plan: a CPU run).
    grad_checkpointing: bool | None = None
    fp8_kernel: str = "auto"
    experiment: str | None = None
    gpus: str | None = None  # "all" or "0,1"; None: GPU 0 (the CPU on a machine without one)
    max_gpu_memory: str | None = None
    parallel: str = "auto"  # several GPUs: "replicas" (one LM each), "layers" (one LM split), auto

    @property
    def checkpointing_unless_planned(self) -> bool:
        """Gradient checkpointing before (or without) a memory plan: on unless asked off."""
        return self.grad_checkpointing is not False


@dataclass
class Inputs:
    """The validated inputs of one run (or of a sweep's shared part)."""

    options: RunOptions
    schemes: list[Scheme]
    checkpoint: CheckpointInfo
    text_config: object
    numels: dict[str, int]
    caption_file: CaptionFile
    tokenizer: object = None
    captions: list[str] = field(default_factory=list)

    @property
    def calib_path(self) -> Path:
        return self.caption_file.path
