"""Fixtures for the service tests: apps on the shared smoke store, a real uvicorn server, test images."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings


def image_bytes(color=(40, 120, 60), size=(48, 48), fmt="PNG", mode="RGB", **save_args) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt, **save_args)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def backgrounds(smoke_world: Path) -> list[bytes]:
    """One background frame (PNG bytes) of each of two different seen locations."""
    seen = json.loads((smoke_world / "tasks.json").read_text())["seen"]
    return [sorted((smoke_world / "backgrounds" / location).glob("*.png"))[0].read_bytes() for location in seen[:2]]


@pytest.fixture(scope="session")
def frames(smoke_world: Path) -> list[bytes]:
    """Eight camera-trap frames (PNG bytes) of one seen location."""
    seen = json.loads((smoke_world / "tasks.json").read_text())["seen"]
    return [path.read_bytes() for path in sorted((smoke_world / "images" / seen[0]).glob("*.png"))[:8]]


@pytest.fixture(scope="session")
def make_app(smoke_store: Path) -> Callable[..., FastAPI]:
    def make(**overrides) -> FastAPI:
        return create_app(Settings(store=smoke_store, default_steps=10, _env_file=None, **overrides))

    return make


@pytest.fixture(scope="module")
def client(make_app) -> Iterator[TestClient]:
    with TestClient(make_app()) as test_client:
        yield test_client


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run `app` under a real uvicorn server in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, already ours: no race with other processes
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
