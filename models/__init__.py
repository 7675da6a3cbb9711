"""What a model is: architectures, the checkpoint contract, preprocessing and prediction."""
