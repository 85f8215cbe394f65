"""The ASGI app (starlette): routes, the API key, the origin check, readiness, the page.

Routes: ``/`` (the page) and ``/static/…`` (its script), ``/health``, ``/metrics``,
``GET /v1/models``, ``POST /v1/chat/completions``, websocket ``/v1/realtime?model=NAME``.

Where it decides who may do what (:func:`build_app`):

* **API key**: when the server has one, every ``/v1/…`` route and ``/metrics`` want it, as
  ``Authorization: Bearer KEY`` or — for browsers, which cannot set headers on a websocket — as
  the websocket subprotocol ``openai-insecure-api-key.KEY`` (the OpenAI Realtime convention);
  compared in constant time (``hmac.compare_digest``). ``/``, ``/static`` and ``/health`` are open:
  the page holds no data, and load balancers probe ``/health`` without credentials.
* **Origin**: a browser's websocket or POST from another site is refused (403) unless its
  ``Origin`` is the server's own or listed in ``allowed_origins``; clients that send no Origin
  (scripts, SDKs) are let through to the API-key check.
* **Capacity**: a websocket beyond ``max_sessions`` is refused with HTTP 429 before it is
  accepted; a response beyond the batch's rows is a 429 / an ``error`` event.
* **Readiness**: until the model is loaded, ``/health`` is 503 and the API answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import threading
from importlib import resources
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from reempathy.serve.chat import chat_completions, error_response, models
from reempathy.serve.metrics import CONTENT_TYPE
from reempathy.serve.realtime import RealtimeSession
from reempathy.serve.server import Server

KEY_PROTOCOL = "openai-insecure-api-key."


def static_dir() -> str:
    """The folder of the page's files, shipped in the package."""
    return str(resources.files("reempathy.serve") / "static")


def build_app(server: Server, load: bool = True) -> Starlette:
    """The app around ``server``; ``load`` starts loading the model in a thread when the app starts."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if load:
            threading.Thread(target=server.load, name="reempathy-load", daemon=True).start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, server.close)

    def authorized(conn: HTTPConnection, offered: list[str] | None = None) -> bool:
        key = server.api_key
        if key is None:
            return True
        given = ""
        header = conn.headers.get("authorization", "")
        if header[:7].lower() == "bearer ":
            given = header[7:].strip()
        for protocol in offered or []:
            if protocol.startswith(KEY_PROTOCOL):
                given = protocol[len(KEY_PROTOCOL):]
        return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), key.encode("utf-8"))

    def origin_ok(conn: HTTPConnection) -> bool:
        origin = conn.headers.get("origin")
        if origin is None:
            return True
        allowed = server.settings.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        host = conn.headers.get("host", "")
        return origin in (f"http://{host}", f"https://{host}")

    def gate(conn: HTTPConnection, offered: list[str] | None = None) -> Response | None:
        """The refusal for a request that may not go on (None: it may)."""
        if not origin_ok(conn):
            return error_response(403, "origin_not_allowed", f"origin {conn.headers.get('origin', '')[:100]!r} is not allowed; add it to [serve] allowed_origins")
        if not authorized(conn, offered):
            return error_response(401, "invalid_api_key", "this server wants an API key: Authorization: Bearer KEY")
        if server.status != "ok":
            why = server.error or "the model is loading"
            return error_response(503, "not_ready", f"the server is not ready ({server.status}): {why}", kind="server_error")
        return None

    async def page(request: Request) -> Response:
        html = (resources.files("reempathy.serve") / "static" / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    async def health(request: Request) -> Response:
        body: dict[str, Any] = {"status": server.status, "models": list(server.models)}
        if server.status == "ok":
            body.update(sessions=server.sessions, max_sessions=server.settings.max_sessions,
                        rows_running=server.scheduler.running if server.scheduler else 0,
                        scheduler_alive=bool(server.scheduler and server.scheduler.alive),
                        device=str(server.backbone.model.device) if server.backbone else None)
        if server.error:
            body["error"] = server.error
        ok = server.status == "ok" and bool(server.scheduler and server.scheduler.alive)
        return JSONResponse(body, 200 if ok else 503)

    async def metrics(request: Request) -> Response:
        if not authorized(request):
            return error_response(401, "invalid_api_key", "this server wants an API key: Authorization: Bearer KEY")
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    async def list_models(request: Request) -> Response:
        refusal = gate(request)
        return refusal if refusal is not None else models(server)

    async def chat(request: Request) -> Response:
        refusal = gate(request)
        return refusal if refusal is not None else await chat_completions(server, request)

    async def realtime(websocket: WebSocket) -> None:
        offered = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        refusal = gate(websocket, offered)
        model = websocket.query_params.get("model")
        if refusal is None and model is not None and model not in server.models:
            refusal = error_response(404, "model_not_found", f"unknown model {model[:80]!r}; this server offers: {', '.join(server.models)}")
        if refusal is None and server.sessions >= server.settings.max_sessions:
            server.metrics.refused.inc()
            refusal = error_response(429, "server_busy", f"all {server.settings.max_sessions} sessions are taken; try again later", kind="server_error")
        if refusal is not None:
            await _deny(websocket, refusal)
            return
        server.sessions += 1
        try:
            subprotocol = "realtime" if "realtime" in offered else None
            await websocket.accept(subprotocol=subprotocol)
            await RealtimeSession(server, websocket, model or server.config.default_model).run()
        finally:
            server.sessions -= 1

    routes = [
        Route("/", page),
        Route("/health", health),
        Route("/metrics", metrics),
        Route("/v1/models", list_models),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        WebSocketRoute("/v1/realtime", realtime),
        Mount("/static", StaticFiles(directory=static_dir()), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = server
    return app


async def _deny(websocket: WebSocket, response: Response) -> None:
    """Refuse a websocket before accepting it: the HTTP response itself where the server can send one."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(response)
    else:
        await websocket.close(code=1008 if response.status_code in (401, 403) else 1013)


__all__ = ["build_app", "static_dir"]
