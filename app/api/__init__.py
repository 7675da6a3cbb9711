"""The HTTP layer: thin routers, response schemas and the one error map."""
