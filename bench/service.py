"""Latency of a running service over real HTTP, one request at a time, and the server's resident memory.

    wildpdiff serve --store model_store/demo &
    python bench/service.py --url http://127.0.0.1:8000 --data data/demo [--n 30] [--out bench/results/service.json]

Every /adapters call uses a fresh seed, so it measures generation, not the adapter cache. Resident memory
is read from the server's own /metrics (process_resident_memory_bytes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(1000 * s for s in seconds)
    return {
        "p50_ms": round(statistics.median(ms), 1),
        "p95_ms": round(ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))], 1),
        "n": len(ms),
    }


def timed(http: httpx.Client, n: int, **request) -> list[float]:
    seconds = []
    for i in range(n):
        args = {k: (v(i) if callable(v) else v) for k, v in request.items()}
        start = time.perf_counter()
        http.post(**args).raise_for_status()
        seconds.append(time.perf_counter() - start)
    return seconds


def resident_mib(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return round(float(line.split()[1]) / 2**20, 1)
    raise RuntimeError("the server's /metrics has no process_resident_memory_bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--data", required=True, help="a world folder: backgrounds/ and images/ are used")
    parser.add_argument("--n", type=int, default=30, help="requests per measurement")
    parser.add_argument("--out", default="bench/results/service.json")
    args = parser.parse_args()

    data = Path(args.data)
    background = sorted((data / "backgrounds").rglob("*.png"))[0].read_bytes()
    frames = [p.read_bytes() for p in sorted((data / "images").rglob("*.png"))[:16]]
    with httpx.Client(base_url=args.url, timeout=300) as http:
        info = http.get("/info").json()
        rss_start = resident_mib(http)
        bg = {"background": ("bg.png", background)}
        chosen = {"adapter_id": http.post("/adapters", files=bg).headers["X-Adapter-Id"]}
        results = {"adapters": timed(http, args.n, url="/adapters", files=bg, data=lambda i: {"seed": i + 1})}
        for k in (1, 16):
            files = [("images", (f"{i}.png", frame)) for i, frame in enumerate(frames[:k])]
            results[f"classify_{k}"] = timed(http, args.n, url="/classify", files=files, data=chosen)
        report = {
            "url": args.url,
            "store_id": info["store_id"],
            "profile": info["profile"],
            "device": info["device"],
            **{name: percentiles(seconds) for name, seconds in results.items()},
            "resident_mib_start": rss_start,
            "resident_mib_end": resident_mib(http),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
