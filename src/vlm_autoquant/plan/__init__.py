"""What to run, decided before any weight is loaded: the scheme catalog, the effective-bits cost,
the calibration data, input validation, the families of schemes and the GPU placement."""
