"""A real API server for the SDK and CLI tests: uvicorn on 127.0.0.1, in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from jobs.settings import Settings
from tests.api.conftest import dataset  # noqa: F401 - the same fixture for the SDK tests


@pytest.fixture
def live_api(service_settings: Settings) -> Iterator[str]:
    """The base URL of a uvicorn server over the test's database and broker."""
    import uvicorn

    from api.app import create_app

    app = create_app(service_settings)
    app.state.sse_poll_seconds = 0.05
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound before the server starts: no port race
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test API server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
