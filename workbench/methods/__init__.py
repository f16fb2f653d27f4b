"""Methods beside CLIP-ReID, one module each: its own modules, training stage and validation.
What methods share (CLIP loading and the text path, heads, losses, metrics, step-metric
flushing, checkpoints) stays in the package's shared modules."""
