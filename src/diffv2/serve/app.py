"""The HTTP face of the scheduler: an OpenAI-compatible FastAPI app.

``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (with ``stream``: server-sent
events, ``data: {chunk}`` lines ending in ``data: [DONE]``), ``GET /health``, ``GET /metrics`` (Prometheus).
Every error is one OpenAI-style JSON body (``{"error": {...}}``); no traceback reaches a client. With an API
key, the ``/v1`` routes need ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from ..errors import DiffV2Error
from ..generate.text import TextCodec
from .endpoints import Endpoints
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import ApiError, error_body
from .scheduler import Scheduler

log = logging.getLogger("diffv2.serve")
ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


def create_app(
    scheduler: Scheduler,
    codec: TextCodec | None,
    *,
    model_name: str,
    api_key: str | None = None,
    metrics: ServerMetrics | None = None,
) -> FastAPI:
    """The app over a started scheduler; ``codec`` None serves token-id prompts only."""
    app = FastAPI(title="diffv2", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = metrics or ServerMetrics(scheduler.max_batch)
    scheduler.observers.append(metrics.observe)
    metrics.watch_busy(scheduler.busy_seconds)
    created = int(time.time())

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body, status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the request body is not valid JSON ({first['msg']})"), status_code=400)
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        return JSONResponse(error_body(message.replace("Value error, ", ""), param=param), status_code=400)

    @app.exception_handler(DiffV2Error)
    async def _bad_input(request: Request, err: DiffV2Error) -> JSONResponse:
        return JSONResponse(error_body(str(err)), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), kind), status_code=err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        log.error("internal error on %s", request.url.path, exc_info=err)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        if not scheduler.healthy:
            raise ApiError(503, scheduler.error or "the scheduler is not running", kind="server_error")
        return JSONResponse({"status": "ok", "running": scheduler.running, "waiting": scheduler.waiting})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict[str, Any]:
        card = {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "diffv2",
            "max_model_len": scheduler.max_len,
        }
        return {"object": "list", "data": [card]}

    endpoints = Endpoints(scheduler, codec, model_name)
    guarded = [Depends(check_key)]
    app.post("/v1/completions", dependencies=guarded)(endpoints.completions)
    app.post("/v1/chat/completions", dependencies=guarded)(endpoints.chat)
    app.add_middleware(_CountRequests, metrics=metrics)
    return app


class _CountRequests:
    """Counts requests by route and status code (a plain ASGI middleware: it leaves streaming untouched)."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(path, str(status)).inc()
