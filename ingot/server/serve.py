"""`ingot serve`: load the model, then run the app under uvicorn until Ctrl-C or SIGTERM."""

from __future__ import annotations

import ipaddress
import sys

from ingot.errors import IngotError

# Streams still open at shutdown get this long to finish; the engine stops the running one meanwhile.
GRACEFUL_SHUTDOWN_S = 5


def serve(args) -> int:
    import uvicorn

    import ingot
    from ingot.server.app import create_app

    if args.max_queue < 1:
        raise IngotError(f"--max-queue must be at least 1, got {args.max_queue}")
    if args.request_timeout <= 0:
        raise IngotError(f"--request-timeout must be positive, got {args.request_timeout}")
    if not 0 < args.port < 65536:
        raise IngotError(f"--port must be between 1 and 65535, got {args.port}")
    model = ingot.load(args.model, device=args.device, max_context=args.ctx)
    app = create_app(model, args.model, api_key=args.api_key, max_queue=args.max_queue,
                     request_timeout=args.request_timeout)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"Serving {args.model} ({model.device}, context {model.max_context}) at http://{host}:{args.port}/v1",
          file=sys.stderr)
    if not args.api_key and not _is_loopback(args.host):
        print(f"warning: {args.host} is reachable from other machines and no --api-key is set", file=sys.stderr)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    uvicorn.Server(config).run()
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
