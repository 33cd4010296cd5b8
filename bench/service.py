"""Latency and throughput of the service over real HTTP, with 1, 8 and 32 concurrent clients, cross-request
batching on and off, and its memory.

    python -m bench.service --store model_store/demo --data data/demo [--n 30] [--pin | --no-pin]
                            [--out bench/results/service.json]
    python -m bench.service --url http://127.0.0.1:8000 --data data/demo     # a server that is already running

With `--store` the benchmark starts `wildpdiff serve` twice, each time fresh on a free port: with batching on
(the server's default `max_batch`, key "batching_on") and off (`WILDPDIFF_MAX_BATCH=1`, "batching_off"). For
each it reports the settings it ran with (cores, torch threads, max_batch, max_pending), its peak RSS and CPU
seconds. The routes, at every client count:

- `adapters`: /adapters as the store's serving table chooses (the demo store serves retrieval methods there:
  no DDIM);
- `adapters_generate`: /adapters with method=generate, DDIM at the server's default steps: where batching
  draws many requests' adapters in one denoiser call;
- `classify_16`: /classify with 16 frames and an adapter_id (and `classify_1`, 1 frame, 1 client).

Every /adapters call uses a fresh seed, so it measures generation, not the adapter cache.

Load: concurrent clients are asyncio tasks sharing one connection pool and one queue of max(n, 3 x clients)
requests per level. A 429 (server busy: `max_pending` requests admitted) is counted, its request goes back to
the queue for the next free client, and the refused client waits its Retry-After, as `app.client` does.
Latencies are those of the answered attempts; throughput counts the answered requests from the first request
to the last answer, so that a refused client still asleep when the work is done does not count as server time.
Each level also records the mean requests per model call (the server's wildpdiff_batch_size histogram, per
kind of job) and the X-Method headers of its answers. Resident memory is read from the server's own /metrics.

Pinning: where this process may use >= 3 cores, the server runs on all of them but the last (`taskset -c`)
and the load generator (this process) on the last, so that the clients do not take the server's cores. On 2
cores nothing is pinned by default: the server would be left one core for its event loop and its inference
thread together; `--pin` does it anyway, `--no-pin` never. What was done is recorded under "pinning".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from app.settings import Settings
from bench.measure import load_average, peak_rss_mib, percentiles, wait_measured

CLIENTS = (1, 8, 32)
CLASSIFY_BATCH = 16
# The servers compared, each by the environment it starts with: the batching defaults, and every request alone.
BATCHING = {"batching_on": {}, "batching_off": {"WILDPDIFF_MAX_BATCH": "1"}}
BATCH_SERIES = re.compile(r'^wildpdiff_batch_size_(sum|count)\{kind="([^"]*)"\} (\S+)$')


# -----------------------------------------------------------------------------
# where the server and the load generator run


def plan_pinning(pin: bool | None) -> dict:
    """The cores of the server and of the load generator. `pin` None: pin where this process has >= 3 cores."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return {"applied": False, "reason": "1 core: nothing to pin", "cores": cores}
    if pin is False:
        return {"applied": False, "reason": "--no-pin", "cores": cores}
    if pin is None and len(cores) < 3:
        reason = (
            f"{len(cores)} cores: pinning would leave the server one core for its event loop and inference thread "
            "together, so server and clients share both; --pin pins anyway"
        )
        return {"applied": False, "reason": reason, "cores": cores}
    if len(cores) < 3:
        reason = f"--pin on {len(cores)} cores: the server's event loop and inference thread share core {cores[0]}"
    else:
        reason = f"{len(cores)} cores: the server on all but the last, the load generator on the last"
    return {"applied": True, "reason": reason, "cores": cores, "server_cores": cores[:-1], "client_cores": cores[-1:]}


@contextmanager
def pinned(cores: Sequence[int] | None) -> Iterator[None]:
    """This thread (the clients' event loop, and any thread it starts) on `cores` for the block (None: as it
    is). The affinity is restored afterwards, so that later benchmarks and their children get every core."""
    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def server_config(env: dict[str, str], pinning: dict) -> dict:
    """What a server started with `env` (on top of this environment and .env) under `pinning` runs with."""
    settings = Settings(**{name.removeprefix("WILDPDIFF_").lower(): value for name, value in env.items()})
    cores = pinning.get("server_cores", pinning["cores"])
    return {
        "env": env,
        "cores": cores,
        # Settings.intra_op_threads, counted on the server's cores (its taskset) rather than on this process's
        "torch_threads": settings.torch_threads or max(1, len(cores) - 1),
        "max_batch": settings.max_batch,
        "max_batch_wait_ms": settings.max_batch_wait_ms,
        "max_pending": settings.max_pending,
        "default_steps": settings.default_steps,
    }


# -----------------------------------------------------------------------------
# load


def batch_totals(metrics: str) -> Counter:
    """The server's /metrics text -> {("sum" | "count", kind): value} of its wildpdiff_batch_size histogram."""
    totals: Counter = Counter()
    for line in metrics.splitlines():
        if match := BATCH_SERIES.match(line):
            totals[match[1], match[2]] = float(match[3])
    return totals


def requests_per_model_call(before: Counter, after: Counter) -> dict[str, float]:
    """Mean requests per model call, per kind of job, between two `batch_totals`."""
    calls = {kind: after["count", kind] - before["count", kind] for _, kind in after}
    return {kind: round((after["sum", kind] - before["sum", kind]) / calls[kind], 2) for kind in calls if calls[kind]}


async def load(url: str, n: int, clients: int, request: Callable[[int], dict]) -> dict:
    """`n` requests (`request(i)` -> httpx.post kwargs) from `clients` concurrent clients."""
    latencies: list[float] = []
    rejected = 0
    methods: Counter = Counter()
    todo = deque(range(n))  # shared: each request index is answered exactly once
    last_answer = 0.0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal rejected, last_answer
        while todo:
            i = todo.popleft()
            start = time.perf_counter()
            response = await http.post(**request(i))
            if response.status_code == 429:
                rejected += 1
                todo.append(i)  # for the next free client: this one waits as it was told to
                await asyncio.sleep(float(response.headers.get("Retry-After", 1)))
                continue
            response.raise_for_status()
            last_answer = time.perf_counter()
            latencies.append(last_answer - start)
            if method := response.headers.get("X-Method"):
                methods[method] += 1

    load_before = load_average()
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=clients)) as http:
        batches_before = batch_totals((await http.get("/metrics")).text)
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        batches_after = batch_totals((await http.get("/metrics")).text)
    return {
        "clients": clients,
        **percentiles(latencies),
        "requests_per_s": round(n / (last_answer - start), 2),
        "rejected_429": rejected,
        "requests_per_model_call": requests_per_model_call(batches_before, batches_after),
        "x_method": dict(methods),
        "load_before": load_before,
        "load_after": load_average(),
    }


def resident_mib(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return round(float(line.split()[1]) / 2**20, 1)
    raise RuntimeError("the server's /metrics has no process_resident_memory_bytes")


def measure(url: str, data: Path, n: int, clients=CLIENTS, extra_steps=()) -> dict:
    """The routes of the module docstring per client count, and method=generate at each of `extra_steps`
    (1 client), against the server at `url`."""
    background = sorted((data / "backgrounds").rglob("*.png"))[0].read_bytes()
    frames = [p.read_bytes() for p in sorted((data / "images").rglob("*.png"))[:CLASSIFY_BATCH]]
    bg = {"background": ("bg.png", background)}
    seeds = iter(range(1, 10**9))  # never repeat a seed: a repeat would be a cache hit

    def adapters(**form) -> Callable[[int], dict]:
        return lambda i: {"url": "/adapters", "files": bg, "data": {"seed": next(seeds), **form}}

    def classify(k: int, adapter_id: str) -> Callable[[int], dict]:
        files = [("images", (f"{i}.png", frame)) for i, frame in enumerate(frames[:k])]
        return lambda i: {"url": "/classify", "files": files, "data": {"adapter_id": adapter_id}}

    def fresh_adapter_id(http: httpx.Client) -> str:
        response = http.post("/adapters", files=bg, data={"seed": next(seeds)})
        response.raise_for_status()
        return response.headers["X-Adapter-Id"]

    with httpx.Client(base_url=url, timeout=300) as http:
        info = http.get("/info").json()
        rss_start = resident_mib(http)
        # warm-up: each route once
        http.post("/adapters", files=bg, data={"seed": next(seeds), "method": "generate"}).raise_for_status()
        warm = {"adapter_id": fresh_adapter_id(http)}
        http.post("/classify", files=[("images", ("0.png", frames[0]))], data=warm).raise_for_status()

    def levels(request: Callable[[int], dict], counts) -> dict[str, dict]:
        return {str(c): asyncio.run(load(url, max(n, 3 * c), c, request)) for c in counts}

    report = {
        "url": url,
        "store_id": info["store_id"],
        "profile": info["profile"],
        "device": info["device"],
        "adapters": levels(adapters(), clients),
        "adapters_generate": levels(adapters(method="generate"), clients),
        **{f"adapters_generate_steps{s}": levels(adapters(method="generate", steps=s), (1,)) for s in extra_steps},
    }
    # The levels above may have generated more adapters than the server's cache holds (adapter_cache_size):
    # /classify's adapter_id must be one it still has.
    with httpx.Client(base_url=url, timeout=300) as http:
        adapter_id = fresh_adapter_id(http)
    report["classify_1"] = levels(classify(1, adapter_id), (1,))
    report[f"classify_{CLASSIFY_BATCH}"] = levels(classify(CLASSIFY_BATCH, adapter_id), clients)
    report["resident_mib_start"] = rss_start
    for level in report[f"classify_{CLASSIFY_BATCH}"].values():
        level["images_per_s"] = round(CLASSIFY_BATCH * level["requests_per_s"], 1)
    with httpx.Client(base_url=url, timeout=300) as http:
        report["resident_mib_end"] = resident_mib(http)
    return report


# -----------------------------------------------------------------------------
# servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(
    store: str,
    log: Path,
    usage: dict,
    env: dict | None = None,
    cores: Sequence[int] | None = None,
    ready_timeout: float = 180,
) -> Iterator[str]:
    """`wildpdiff serve --store STORE` on a free port (`env`: extra environment variables, e.g. WILDPDIFF_*
    settings; `cores`: run it on those only) -> its URL; on exit, stop it and fill `usage` with its peak RSS
    and CPU seconds."""
    port = free_port()
    command = [sys.executable, "-m", "training", "serve", "--store", store, "--port", str(port)]
    if cores is not None:
        command = ["taskset", "-c", ",".join(map(str, cores)), *command]  # taskset execs: the pid stays the server's
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


def measure_server(
    store: str, data: Path, n: int, log: Path, env: dict, pinning: dict, clients=CLIENTS, extra_steps=()
) -> dict:
    """A fresh server started with `env` on the server's cores of `pinning`, measured from the load generator's
    cores -> `measure`'s report and "server": its settings, peak RSS and CPU seconds."""
    server = server_config(env, pinning)
    with serve(store, log, server, env, pinning.get("server_cores")) as url, pinned(pinning.get("client_cores")):
        report = measure(url, data, n, clients, extra_steps)
    return {**report, "server": server}


def run(store: str, data: Path, n: int, logs: Path, pinning: dict, clients=CLIENTS, extra_steps=()) -> dict:
    """Batching on, then off, each on its own fresh server (logs: LOGS/server_batching_*.log); `extra_steps`
    with batching on only."""
    report = {"pinning": pinning}
    for name, env in BATCHING.items():
        steps = extra_steps if name == "batching_on" else ()
        report[name] = measure_server(store, data, n, logs / f"server_{name}.log", env, pinning, clients, steps)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server")
    where.add_argument("--store", help="start `wildpdiff serve --store STORE` for the measurement")
    parser.add_argument("--data", required=True, help="a world folder: backgrounds/ and images/ are used")
    parser.add_argument("--n", type=int, default=30, help="requests per measurement (at least 3 per client)")
    parser.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        help="server on all cores but the last, clients on the last (default: where there are >= 3 cores)",
    )
    parser.add_argument("--out", default="bench/results/service.json")
    args = parser.parse_args()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.url:
        pinning = {"applied": False, "reason": "--url: a server this benchmark did not start"}
        report = {"pinning": pinning, **measure(args.url, Path(args.data), args.n, args.clients)}
    else:
        report = run(args.store, Path(args.data), args.n, out.parent, plan_pinning(args.pin), args.clients)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
