"""The routes, one module per resource; their plumbing (auth, dependencies, errors,
middleware, schemas, transport, the Open Inference Protocol codec) is in app/api."""
