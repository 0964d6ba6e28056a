"""Running the app under uvicorn: in the foreground (the CLI) or on a thread of this process (tests, bench)."""

from __future__ import annotations

import socket
import threading

import uvicorn
from fastapi import FastAPI


def run_forever(app: FastAPI, host: str, port: int, *, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM: uvicorn finishes open requests first)."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)


class BackgroundServer:
    """``with BackgroundServer(app) as server:`` serves ``app`` on ``server.url`` from a thread; ``port`` 0
    takes a free one (bound before uvicorn starts, so no other process can take it in between)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread stopped before it started serving")
            self.thread.join(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.sock.close()
