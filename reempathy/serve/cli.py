"""``reempathy serve``: the command line, and the uvicorn settings the server runs with.

Where it decides: :func:`cmd_serve` refuses to bind anywhere but loopback without an API key
(``--api-key`` or ``REEMPATHY_API_KEY``), reads the serve config (flags override its ``[serve]``
keys, ``--device`` every model's backbone device), and hands the app to uvicorn. The heavy parts
(torch, the model) load in a thread once uvicorn is up, so ``/health`` answers ``loading`` at once.
"""

from __future__ import annotations

import argparse
import os
import warnings
from typing import Any

API_KEY_ENV = "REEMPATHY_API_KEY"


def add_serve_parser(sub: Any) -> None:
    """Register ``reempathy serve``."""
    from reempathy.options import count_arg

    p = sub.add_parser("serve", help="serve the configured strategies over a realtime websocket and HTTP (docs/serving.md)")
    p.add_argument("--config", "-c", required=True, help="serve config (TOML with [serve] and [[serve.models]]; see configs/serve.toml)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs --api-key)")
    p.add_argument("--port", type=_port, default=8000, help="port to bind (default 8000; 0: any free port)")
    p.add_argument("--max-sessions", type=count_arg, help="realtime sessions at once = rows of the batch (overrides [serve] max_sessions)")
    p.add_argument("--api-key", help=f"require this bearer token on the API (or set {API_KEY_ENV})")
    p.add_argument("--device", help="run the model on this device, e.g. cuda:1 (one server process per GPU)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="uvicorn's log level")
    p.set_defaults(func=cmd_serve)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: give a whole number 0-65535") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {value}: give a whole number 0-65535")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted."""
    from reempathy.errors import UsageError
    from reempathy.serve.config import is_loopback

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is not None and (len(api_key) < 8 or not api_key.isprintable() or " " in api_key):
        raise UsageError("--api-key: give a key of at least 8 printable characters without spaces")
    if not is_loopback(args.host) and api_key is None:
        raise UsageError(
            f"--host {args.host}: binding beyond this machine needs an API key; give --api-key KEY (or set {API_KEY_ENV})"
        )
    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as exc:
        from reempathy.errors import NotAvailableError

        raise NotAvailableError(
            f"`reempathy serve` needs the serve extra ({exc.name} is missing): pip install 'reempathy[serve]'"
        ) from None

    from reempathy.registry import default_discovery
    from reempathy.serve.app import build_app
    from reempathy.serve.config import load_serve_config
    from reempathy.serve.server import Server

    # uvicorn's `websockets` implementation (the one that can answer a refused handshake with 401/403/429)
    # is marked deprecated in favour of a sans-I/O one that cannot yet; it works, so say nothing at startup.
    warnings.filterwarnings("ignore", message=".*`websockets` implementation is deprecated")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"websockets\..*")
    registry = default_discovery().registry
    config = load_serve_config(args.config, registry, {"max_sessions": args.max_sessions}, device=args.device)
    server = Server(config, registry, api_key=api_key)
    app = build_app(server)
    uvicorn.Server(uvicorn_config(app, args.host, args.port, config.settings.max_message_bytes, args.log_level)).run()
    return 0


def uvicorn_config(app: Any, host: str, port: int, max_message_bytes: int, log_level: str = "info") -> Any:
    """uvicorn's settings: the websockets implementation (it can refuse a handshake with an HTTP status).

    uvicorn closes a websocket whose message is over ``ws_max_size`` (4 × the server's message cap);
    messages between the cap and that get an ``error`` event and the session goes on.
    """
    import uvicorn

    return uvicorn.Config(
        app, host=host, port=port, ws="websockets", ws_max_size=4 * max_message_bytes, log_level=log_level,
        lifespan="on", timeout_graceful_shutdown=5,
    )


__all__ = ["API_KEY_ENV", "add_serve_parser", "cmd_serve", "uvicorn_config"]
