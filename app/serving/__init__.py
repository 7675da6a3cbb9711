"""The serving core: the registry of loaded models, each served model's stages (decoding in
bounded processes, batching, the compute thread, explaining) and what they need."""
