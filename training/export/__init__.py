"""The export stage of a run: the checkpoint (card, weights) and its report files."""
