"""The data stage of a run: discovery, the split, datasets and loaders, class balance and
the data of one `fit` (training.data.load)."""
