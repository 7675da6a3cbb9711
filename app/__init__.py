"""How a model is served: settings, model registry, dynamic batching and the HTTP API."""
