"""The search: one ModelOpt AutoQuantize call (autoquant), its data-parallel replicas, its
resumable checkpoints and the FP8 kernel it runs on."""
