"""Running the app under uvicorn: in the foreground (the CLI) or on a thread of this process (tests, bench)."""

from __future__ import annotations

import socket
import threading

import uvicorn
from fastapi import FastAPI

from ..errors import ConfigError


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (IPv4 or IPv6, as the host resolves), or a one-line ``ConfigError`` naming
    them: bound before the model loads, so a bad address fails at once, and in our words rather than uvicorn's."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except (OSError, UnicodeError) as e:  # socket.gaierror for a name that does not resolve is an OSError
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({why})") from None
    return sock


def run_forever(app: FastAPI, sock: socket.socket, *, log_level: str = "info") -> None:
    """Serve on ``sock`` (from :func:`bind_socket`) until interrupted (Ctrl-C / SIGTERM: uvicorn finishes open
    requests first)."""
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=30)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


class BackgroundServer:
    """``with BackgroundServer(app) as server:`` serves ``app`` on ``server.url`` from a thread; ``port`` 0
    takes a free one (bound before uvicorn starts, so no other process can take it in between)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.sock = bind_socket(host, port)
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
