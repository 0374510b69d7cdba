"""The scheme catalog, shipped inside the package as `vlm_autoquant.configs` (see pyproject.toml)."""
