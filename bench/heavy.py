"""The heaviest requests the service's limits allow, timed over real HTTP (issue #18: under ~5 s on 2 cores).

    python -m bench.heavy --store model_store/demo --data data/demo [--out bench/results/heavy.json]

Starts `wildpdiff serve` on a free port with the settings of this environment (WILDPDIFF_*), then sends, one
at a time, requests that fill the per-request budget (`max_request_pixels` with 40 MP PNGs, whose decoding
is the main cost whatever their file size, `max_steps`, `max_refine_work`, `max_frames`) and reports each one's
status and wall time, and the server's peak RSS.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from pathlib import Path

import httpx
from PIL import Image

from app.settings import Settings
from bench.measure import load_average
from bench.service import serve

BIG_SIDE = 6324  # 39.99 MP: the largest square image under the default max_image_pixels


def png(side: int) -> bytes:
    """A flat-coloured PNG: a few hundred KB on the wire, `side`^2 pixels to decode."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (40, 120, 60)).save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


def filling(pixels: int, side: int = BIG_SIDE) -> list[bytes]:
    """Images of at most `side`^2 pixels each that together hold as close to `pixels` as squares allow."""
    big, rest = divmod(pixels, side * side)
    images = [png(side)] * big
    if (last := math.isqrt(rest)) > 0:
        images.append(png(last))
    return images


def cases(settings: Settings, data: Path) -> dict[str, dict]:
    """Name -> httpx.post kwargs of the heaviest legal requests."""
    background = sorted((data / "backgrounds").rglob("*.png"))[0].read_bytes()
    frames = [p.read_bytes() for p in sorted((data / "images").rglob("*.png"))[: settings.max_frames]]
    side = math.isqrt(settings.max_image_pixels)
    # The pixel budget minus what the small frames hold, filled with the largest images allowed.
    small_pixels = sum(math.prod(Image.open(io.BytesIO(frame)).size) for frame in frames)
    big = filling(settings.max_request_pixels, side)
    big_beside_frames = filling(settings.max_request_pixels - small_pixels, side)
    shots = max(1, settings.max_refine_work // max(1, settings.max_refine_steps))
    refine = min(settings.max_refine_steps, settings.max_refine_work // shots)
    steps = str(settings.max_steps)
    return {
        "classify: pixel budget in 40 MP PNGs": {
            "url": "/classify",
            "files": [("images", (f"{i}.png", image)) for i, image in enumerate(big)],
        },
        "classify: max_images frames + background, max_steps": {
            "url": "/classify",
            "files": [("images", (f"{i}.png", f)) for i, f in enumerate(frames[: settings.max_images])]
            + [("background", ("bg.png", background))],
            "data": {"steps": steps, "method": "generate", "seed": "1"},
        },
        "adapters: pixel budget in backgrounds, max_steps": {
            "url": "/adapters",
            "files": [("background", (f"{i}.png", image)) for i, image in enumerate(big[: settings.max_backgrounds])],
            "data": {"steps": steps, "method": "generate", "seed": "2"},
        },
        f"adapters: few-shot {shots} shots x {refine} refine_steps, max_steps, pixel budget": {
            "url": "/adapters",
            "files": [("background", (f"{i}.png", image)) for i, image in enumerate(big_beside_frames)]
            + [("shots", (f"s{i}.png", frame)) for i, frame in enumerate(frames[:shots])],
            "data": {"steps": steps, "refine_steps": str(refine), "labels": ["empty"] * shots, "seed": "3"},
        },
        f"adapters: {len(frames)} unlabelled frames, max_steps, pixel budget": {
            "url": "/adapters",
            "files": [("background", (f"{i}.png", image)) for i, image in enumerate(big_beside_frames)]
            + [("frames", (f"f{i}.png", frame)) for i, frame in enumerate(frames)],
            "data": {"steps": steps, "seed": "4"},
        },
    }


def measure(url: str, settings: Settings, data: Path) -> dict:
    results = {}
    with httpx.Client(base_url=url, timeout=600) as http:
        http.post("/adapters", files={"background": ("bg.png", png(32))})  # warm-up
        for name, request in cases(settings, data).items():
            load = load_average()
            start = time.perf_counter()
            response = http.post(**request)
            seconds = round(time.perf_counter() - start, 2)
            body = len(request.get("files", [])), sum(len(f[1][1]) for f in request.get("files", []))
            results[name] = {"status": response.status_code, "seconds": seconds, "files": body[0], "bytes": body[1]}
            if response.status_code != 200:
                results[name]["error"] = response.text[:300]
            results[name]["load_before"] = load
            print(f"{name}: {response.status_code} in {seconds} s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--data", required=True, help="a world folder: backgrounds/ and images/ are used")
    parser.add_argument("--out", default="bench/results/heavy.json")
    args = parser.parse_args()
    settings = Settings(store=args.store)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    server: dict = {}
    with serve(args.store, out.with_suffix(".log"), server) as url:
        results = measure(url, settings, Path(args.data))
    limits = ("max_request_pixels", "max_image_pixels", "max_steps", "max_refine_work", "max_frames", "max_images")
    report = {
        "limits": {name: getattr(settings, name) for name in limits},
        "requests": results,
        "slowest_s": max(r["seconds"] for r in results.values()),
        "server": server,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
