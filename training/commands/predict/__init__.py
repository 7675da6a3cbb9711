"""`python -m training predict`: a checkpoint over many images, one result row per image."""
