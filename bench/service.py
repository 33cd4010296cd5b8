"""Latency and throughput of the service over real HTTP, with 1, 8 and 32 concurrent clients, and its memory.

    python -m bench.service --store model_store/demo --data data/demo [--n 30] [--out bench/results/service.json]
    python -m bench.service --url http://127.0.0.1:8000 --data data/demo     # a server that is already running

With `--store` the benchmark starts `wildpdiff serve` itself on a free port and, when done, reports the
server's peak RSS and CPU seconds. Concurrent clients are asyncio tasks sharing one connection pool; at each
level they share max(n, 3 x clients) requests. Every /adapters call uses a fresh seed, so it measures
generation, not the adapter cache; /classify sends 16 frames (and, at 1 client, also 1 frame) with an
adapter_id. A 429 (server busy) is counted and retried after its Retry-After, as `app.client` does;
latencies are those of the answered attempts, throughput counts answered requests over the level's wall
time. Resident memory is also read from the server's own /metrics (process_resident_memory_bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.measure import load_average, peak_rss_mib, percentiles, wait_measured

CLIENTS = (1, 8, 32)
CLASSIFY_BATCH = 16


async def load(url: str, n: int, clients: int, request: Callable[[int], dict]) -> dict:
    """`n` requests (`request(i)` -> httpx.post kwargs) from `clients` concurrent clients."""
    latencies: list[float] = []
    rejected = 0
    todo = iter(range(n))  # shared: each request index goes to exactly one client

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal rejected
        for i in todo:
            while True:
                start = time.perf_counter()
                response = await http.post(**request(i))
                if response.status_code != 429:
                    break
                rejected += 1
                await asyncio.sleep(float(response.headers.get("Retry-After", 1)))
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)

    load_before = load_average()
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=clients)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    return {
        "clients": clients,
        **percentiles(latencies),
        "requests_per_s": round(n / wall, 2),
        "rejected_429": rejected,
        "load_before": load_before,
        "load_after": load_average(),
    }


def resident_mib(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return round(float(line.split()[1]) / 2**20, 1)
    raise RuntimeError("the server's /metrics has no process_resident_memory_bytes")


def measure(url: str, data: Path, n: int, clients=CLIENTS, extra_steps=(10,)) -> dict:
    """/adapters at the server's default steps (and at each of `extra_steps`, 1 client) and /classify, per
    client count."""
    background = sorted((data / "backgrounds").rglob("*.png"))[0].read_bytes()
    frames = [p.read_bytes() for p in sorted((data / "images").rglob("*.png"))[:CLASSIFY_BATCH]]
    bg = {"background": ("bg.png", background)}
    seeds = iter(range(1, 10**9))  # never repeat a seed: a repeat would be a cache hit

    def adapters(steps: int | None = None) -> Callable[[int], dict]:
        form = {} if steps is None else {"steps": steps}
        return lambda i: {"url": "/adapters", "files": bg, "data": {"seed": next(seeds), **form}}

    def classify(k: int, adapter_id: str) -> Callable[[int], dict]:
        files = [("images", (f"{i}.png", frame)) for i, frame in enumerate(frames[:k])]
        return lambda i: {"url": "/classify", "files": files, "data": {"adapter_id": adapter_id}}

    with httpx.Client(base_url=url, timeout=300) as http:
        info = http.get("/info").json()
        rss_start = resident_mib(http)
        chosen = http.post("/adapters", files=bg)  # also warms up both routes
        chosen.raise_for_status()
        adapter_id = chosen.headers["X-Adapter-Id"]
        http.post("/classify", files=[("images", ("0.png", frames[0]))], data={"adapter_id": adapter_id})

    def levels(request: Callable[[int], dict], counts) -> dict[str, dict]:
        return {str(c): asyncio.run(load(url, max(n, 3 * c), c, request)) for c in counts}

    report = {
        "url": url,
        "store_id": info["store_id"],
        "profile": info["profile"],
        "device": info["device"],
        "adapters": levels(adapters(), clients),
        **{f"adapters_steps{s}": levels(adapters(s), (1,)) for s in extra_steps},
        "classify_1": levels(classify(1, adapter_id), (1,)),
        f"classify_{CLASSIFY_BATCH}": levels(classify(CLASSIFY_BATCH, adapter_id), clients),
        "resident_mib_start": rss_start,
    }
    for level in report[f"classify_{CLASSIFY_BATCH}"].values():
        level["images_per_s"] = round(CLASSIFY_BATCH * level["requests_per_s"], 1)
    with httpx.Client(base_url=url, timeout=300) as http:
        report["resident_mib_end"] = resident_mib(http)
    return report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(store: str, log: Path, usage: dict, env: dict | None = None, ready_timeout: float = 180) -> Iterator[str]:
    """`wildpdiff serve --store STORE` on a free port (`env`: extra environment variables, e.g. WILDPDIFF_*
    settings) -> its URL; on exit, stop it and fill `usage` with its peak RSS and CPU seconds."""
    port = free_port()
    command = [sys.executable, "-m", "training", "serve", "--store", store, "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}: see {log}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready within {ready_timeout:.0f} s: see {log}")
            time.sleep(0.5)
        yield url
    finally:
        if process.returncode is None:
            usage["peak_rss_mib"] = peak_rss_mib(process.pid)
            process.terminate()  # uvicorn shuts down cleanly on SIGTERM
            usage.update(wait_measured(process, kill_after=30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server")
    where.add_argument("--store", help="start `wildpdiff serve --store STORE` for the measurement")
    parser.add_argument("--data", required=True, help="a world folder: backgrounds/ and images/ are used")
    parser.add_argument("--n", type=int, default=30, help="requests per measurement (at least 3 per client)")
    parser.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    parser.add_argument("--out", default="bench/results/service.json")
    args = parser.parse_args()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.url:
        report = measure(args.url, Path(args.data), args.n, args.clients)
    else:
        server: dict = {}
        with serve(args.store, out.with_suffix(".log"), server) as url:
            report = measure(url, Path(args.data), args.n, args.clients)
        report["server"] = server
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
