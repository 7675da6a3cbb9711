"""The commands of `python -m training` other than `fit` (training.fit): one module each."""
