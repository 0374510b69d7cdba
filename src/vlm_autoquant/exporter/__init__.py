"""A finished run into a servable checkpoint: inputs, assembly, verification, engines, tracking."""
