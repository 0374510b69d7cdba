"""The foundations every stage stands on: errors, paths, artifact names, integrity checks,
interrupts and timing. Nothing here imports torch, ModelOpt or MLflow."""
