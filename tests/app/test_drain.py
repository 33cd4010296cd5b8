"""A clean drain (app/drain.py) of a real `wildpdiff serve` process: on SIGTERM it stops admitting (503 +
Connection: close, /readyz included), lets in-flight requests finish within the grace period, cuts the rest,
and exits 0."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.app.conftest import image_bytes

GRACE_S = 3
BOUNDARY = "drain-test-boundary"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def wildpdiff_serve(store: Path, log: Path, env: dict[str, str]) -> Iterator[tuple[subprocess.Popen, int]]:
    """`wildpdiff serve` in its own process on a free port, ready; killed if the test leaves it running."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WILDPDIFF_")}
    command = [sys.executable, "-m", "training", "serve", "--store", str(store), "--port", str(port)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**clean, **env})
    try:
        deadline = time.monotonic() + 120
        while get(port, "/readyz")[0] != 200:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def get(port: int, path: str, connection: http.client.HTTPConnection | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body); status 0 when nothing listens."""
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    except ConnectionError:
        return 0, {}, b""


def half_sent_classify(port: int, images: int = 2) -> tuple[socket.socket, bytes]:
    """A POST /classify whose headers and half its body are sent: in flight, waiting for the rest."""
    body = (
        b"".join(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n\r\n'.encode()
            + image_bytes(color=(10 * i, 80, 40))
            + b"\r\n"
            for i in range(images)
        )
        + f"--{BOUNDARY}--\r\n".encode()
    )
    head = (
        f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(head + body[: len(body) // 2])
    return sock, body[len(body) // 2 :]


def in_flight(port: int) -> float:
    _, _, text = get(port, "/metrics")
    line = next(line for line in text.decode().splitlines() if line.startswith("wildpdiff_requests_in_flight "))
    return float(line.split()[1]) - 1  # not counting this /metrics request


def test_sigterm_drains_then_exits_0(smoke_store, tmp_path):
    log = tmp_path / "serve.log"
    with wildpdiff_serve(smoke_store, log, {"WILDPDIFF_DRAIN_GRACE_S": str(GRACE_S)}) as (process, port):
        finishing, rest = half_sent_classify(port)
        stuck, _ = half_sent_classify(port)  # never completed: the grace period ends it
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        assert get(port, "/healthz", idle)[0] == 200  # a keep-alive connection, open before the signal
        while in_flight(port) < 2:
            time.sleep(0.05)

        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while (ready := get(port, "/readyz"))[0] != 503:  # a tick of the event loop at most
            assert ready[0] == 200 and time.monotonic() - signalled < 10
            time.sleep(0.02)
        assert ready[1]["connection"] == "close" and "shutting down" in json.loads(ready[2])["error"]
        status, headers, body = get(port, "/info", idle)  # new work on an open connection: refused
        assert status == 503 and headers["connection"] == "close" and int(headers["retry-after"]) >= 1
        assert get(port, "/healthz")[0] == 200  # alive while draining

        finishing.sendall(rest)  # the in-flight request completes normally
        response = http.client.HTTPResponse(finishing)
        response.begin()
        assert response.status == 200, response.read()
        assert len(json.loads(response.read())["predictions"]) == 2

        assert process.wait(timeout=60) == 0, log.read_text()
        assert time.monotonic() - signalled >= GRACE_S  # it waited for the stuck request, then cut it
        assert not stuck.recv(1024).startswith(b"HTTP/1.1 200")
    assert "draining:" in log.read_text()


def test_an_idle_server_exits_0_on_ctrl_c(smoke_store, tmp_path):
    log = tmp_path / "serve.log"
    with wildpdiff_serve(smoke_store, log, {"WILDPDIFF_DRAIN_GRACE_S": "30"}) as (process, port):
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0, log.read_text()
    assert "Traceback" not in log.read_text()
