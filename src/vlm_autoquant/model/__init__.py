"""The model on disk and in memory: checkpoint inspection, LM-only loading, the weights'
identity, the quantizer state and the embedded demo checkpoint."""
