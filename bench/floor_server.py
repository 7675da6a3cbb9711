"""The floor of the request path: the service's HTTP server stack with a minimal ASGI endpoint.

    python -m bench.floor_server --port N [the flags of python -m app that shape the server]

uvicorn configured as app.process.server configures it for the service (the same protocol
class with its per-phase deadlines and connection cap, the same options), serving an ASGI
callable that reads the request body and answers a constant JSON document of the size of a
one-image /predict answer: what any Python server on this stack pays per request, and so the
floor that bench.request_path holds /predict against. Bench only.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from types import SimpleNamespace

from starlette.types import Receive, Scope, Send

from app.metrics import Metrics

logger = logging.getLogger(__name__)

# the shape and size of a one-image, top-5 answer of /predict
ANSWER = json.dumps({"model": "resnet50", "task": "single_label", "results": [{
    "filename": "img0.jpg", "predictions": [
        {"index": i, "label": f"class_{i:04d}", "score": 0.123456789} for i in range(5)],
    "unknown": False}]}, separators=(",", ":")).encode()
HEADERS = [(b"content-type", b"application/json"),
           (b"content-length", str(len(ANSWER)).encode())]


class FloorApp:
    """Reads the whole body, answers `ANSWER`; nothing else (no routing, no middleware)."""

    def __init__(self) -> None:
        self.state = SimpleNamespace(metrics=Metrics())  # what server_config reads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI scope."""
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": ANSWER})


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the floor on the service's server configuration until SIGTERM/SIGINT."""
    import uvicorn

    from app.__main__ import parse_settings
    from app.process.server import server_config

    settings = parse_settings(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr)
    config = server_config(FloorApp(), settings)  # type: ignore[arg-type]
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
