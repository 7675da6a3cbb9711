"""How a model is made: data loading, the training loop, metrics, reports and export."""
