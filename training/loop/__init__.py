"""The loop stage of a run: one epoch of training, the validation pass, the LR schedule, the
metrics and the resume state."""
