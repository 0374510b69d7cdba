"""A run from searched model to tracked result: one scheme (pipeline) or many (sweep), solved,
evaluated, saved, described in the manifest and reported to MLflow."""
