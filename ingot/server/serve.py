"""`ingot serve`: load the model, then run the app under uvicorn until Ctrl-C or SIGTERM.

On SIGTERM uvicorn stops accepting connections and waits for the open ones, so running and queued
requests drain (each ends by --request-timeout at the latest); then the process exits 0, a clean stop a
supervisor should not report as a crash.
"""

from __future__ import annotations

import ipaddress
import signal
import sys

from ingot.errors import IngotError


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
    if args.max_batch < 1:
        raise IngotError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.step_tokens < 1:
        raise IngotError(f"--step-tokens must be at least 1, got {args.step_tokens}")
    if args.kv_blocks is not None and args.kv_blocks < 1:
        raise IngotError(f"--kv-blocks must be at least 1, got {args.kv_blocks}")
    if args.kv_cache_gb is not None and not args.kv_cache_gb > 0:
        raise IngotError(f"--kv-cache-gb must be positive, got {args.kv_cache_gb}")
    model = ingot.load(args.model, device=args.device, max_context=args.ctx)
    app = create_app(model, args.model, api_key=args.api_key, max_queue=args.max_queue,
                     request_timeout=args.request_timeout, max_batch=args.max_batch, kv_blocks=args.kv_blocks,
                     kv_cache_gb=args.kv_cache_gb, prefix_cache=args.prefix_cache, step_tokens=args.step_tokens)
    engine = app.state.engine
    host = f"[{args.host}]" if ":" in args.host else args.host
    if hasattr(engine, "blocks"):
        how = (f"batches of up to {engine.scheduler.max_batch}, {engine.blocks.n_blocks} KV blocks of "
               f"{engine.blocks.block_size}, prefix cache {'on' if engine.blocks.prefix_cache else 'off'}")
    else:
        how = "one request at a time, through the captured decode graphs (--max-batch 1)"
    print(f"Serving {args.model} ({model.device}, context {model.max_context}; {how}) at "
          f"http://{host}:{args.port}/v1", file=sys.stderr)
    if not args.api_key and not _is_loopback(args.host):
        print(f"warning: {args.host} is reachable from other machines and no --api-key is set", file=sys.stderr)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=args.request_timeout)
    # uvicorn re-raises the signal it stopped for once it is done, through the handler in place before
    # it ran: this one makes a drained SIGTERM end in `return 0` instead of death by signal
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.Server(config).run()
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
