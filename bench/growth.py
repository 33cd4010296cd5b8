"""Generation and fit time as the adapter grows (LoRA rank x blocks, ~1k to 100k+ parameters) and as the zoo
grows (number of checkpoints), on random vectors: timing needs the shapes, not a trained zoo.

    python -m bench.growth --store model_store/demo [--full] [--out bench/results]

Each point builds a throw-away store in a temp folder with the given store's backbone, random condition
features and a random "zoo" of N flat adapters, then runs the real `training.fit.fit_vae` and `fit_denoiser`
twice (s1 and s2 steps): the difference of their CPU times gives seconds per training step, the rest the
fixed cost (z-scoring, encoding the whole zoo, writing files and the loss plot). The projected fit is fixed +
the demo profile's step counts x seconds per step, in CPU seconds (one thread: about wall seconds on an idle
core). Generation goes through `Generator.from_store` on the fitted temp store. One torch thread, as
`wildpdiff fit` uses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.adaptation import DEFAULT_STEPS, generation_seconds
from bench.measure import load_average
from model_store.backbone import BACKBONE_FILE, load_backbone
from model_store.condition import CONDITIONS_FILE, ConditionConfig, ConditionEncoder
from model_store.generator import Generator
from model_store.lora import LoraLayout, adapter_shapes
from model_store.store import Store
from training.fit import FitConfig, fit_denoiser, fit_vae
from training.profiles import get_profile
from training.zoo import Zoo, load_zoo_results

CHECKPOINTS_PER_LOCATION = 20  # the demo zoo: 2 runs x 10 checkpoints
FRAMES_PER_LOCATION = 5  # stored training-half background frames per location


def synthetic_store(
    root: Path, source: Store, layout: LoraLayout, checkpoints: int, seed: int = 0
) -> tuple[Store, Zoo]:
    """A store with `source`'s backbone and random conditions, and a random zoo of `checkpoints` adapters."""
    classifier, backbone = load_backbone(source)
    store = Store.create(root, profile="bench", classes=source.manifest["classes"])
    store.save_tensors(BACKBONE_FILE, classifier.state_dict())
    store.set_component("backbone", backbone.to_dict())
    store.set_component("lora", layout.to_dict())

    generator = torch.Generator().manual_seed(seed)
    n_locations = max(1, checkpoints // CHECKPOINTS_PER_LOCATION)
    locations = [f"loc{i:05d}" for i in range(n_locations)]
    condition = ConditionConfig()
    dim = ConditionEncoder(classifier.tower, backbone, condition).dim
    frames = n_locations * FRAMES_PER_LOCATION
    store.save_tensors(
        CONDITIONS_FILE,
        {
            "features": torch.randn(frames, dim, generator=generator),
            "location": torch.arange(frames) // FRAMES_PER_LOCATION,
            "mean": torch.zeros(dim),
            "std": torch.ones(dim),
            "distance_scale": torch.tensor(1.0),
        },
    )
    store.set_component("condition", {"config": condition.to_dict(), "locations": locations, "dim": dim})

    size = sum(torch.Size(s).numel() for s in adapter_shapes(classifier, layout).values())
    # checkpoints around a per-location centre, as a zoo's are
    location = torch.arange(checkpoints) % n_locations
    centres = torch.randn(n_locations, size, generator=generator)
    vectors = centres[location] + 0.1 * torch.randn(checkpoints, size, generator=generator)
    return store, Zoo(locations, 0.01 * vectors, location)


def two_point(fit_fn, store: Store, zoo: Zoo, steps_key: str, s1: int, s2: int) -> dict:
    """Run a fit stage at s1 and s2 steps -> CPU ms per step and fixed CPU seconds. CPU time, because on
    shared cores the wall-clock difference of two short runs is mostly the neighbours' noise."""
    seconds = {}
    for steps in (s1, s2):
        config = FitConfig(warmup_steps=1, **{steps_key: steps})
        start = time.process_time()
        fit_fn(store, zoo, config, False)
        seconds[steps] = time.process_time() - start
    per_step = (seconds[s2] - seconds[s1]) / (s2 - s1)
    return {
        "steps": [s1, s2],
        "per_step_ms": round(1000 * per_step, 3),
        "fixed_seconds": round(seconds[s1] - s1 * per_step, 3),
    }


def measure_point(source: Store, layout: LoraLayout, checkpoints: int, scale: int, repeats: int) -> dict:
    """`scale` multiplies the training steps measured (1 quick, 4 full)."""
    demo = get_profile("demo").fit
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="wildpdiff-growth-") as tmp:
        store, zoo = synthetic_store(Path(tmp) / "store", source, layout, checkpoints)
        params = zoo.vectors.shape[1]
        # a VAE step costs about params / 10^4 ms: aim at ~0.5 s of steps for a clean difference
        vae = two_point(fit_vae, store, zoo, "vae_steps", 2, scale * min(200, max(12, 200_000 // params)))
        # A denoiser step costs the same at any adapter size (the latent is fixed), but the stage first encodes
        # the whole zoo, seconds for big adapters: enough steps (~5 s) that their cost stands out of its noise.
        denoiser = two_point(fit_denoiser, store, zoo, "denoiser_steps", 2, scale * 150)
        g = Generator.from_store(store)
        frame = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        batch1 = generation_seconds(g, frame, DEFAULT_STEPS, repeats, 1)["seconds"]
        batch64 = generation_seconds(g, frame, DEFAULT_STEPS, max(1, repeats // 5), 64)["seconds"]
        features = g.embed([frame])
        start = time.perf_counter()
        for _ in range(repeats):
            g.distance(features)
        distance = (time.perf_counter() - start) / repeats
    projected = (
        vae["fixed_seconds"]
        + demo.vae_steps * vae["per_step_ms"] / 1000
        + denoiser["fixed_seconds"]
        + demo.denoiser_steps * denoiser["per_step_ms"] / 1000
    )
    return {
        "rank": layout.rank,
        "blocks": layout.blocks,
        "params": params,
        "checkpoints": checkpoints,
        "locations": len(zoo.locations),
        "vae": vae,
        "denoiser": denoiser,
        "fit_cpu_seconds_projected_demo_steps": round(projected, 1),
        "generate_ms_batch1": round(1000 * batch1, 3),
        "generate_ms_per_adapter_batch64": round(1000 * batch64, 4),
        "distance_ms": round(1000 * distance, 4),
        "load_before": load_before,
        "load_after": load_average(),
    }


def zoo_load_ms(store: Store, limit: int = 100) -> float | None:
    """Reading + hash-verifying one real zoo checkpoint (what `fit` does per checkpoint), ms."""
    files = [f for f in sorted(store.manifest["files"]) if f.startswith("zoo/") and f.endswith(".safetensors")]
    if not files:
        return None
    start = time.perf_counter()
    for relpath in files[:limit]:
        store.load_tensors(relpath)
    return round(1000 * (time.perf_counter() - start) / min(limit, len(files)), 3)


def zoo_collection(store: Store) -> dict | None:
    """The store's recorded fine-tuning runs of seen locations: collection grows linearly with them."""
    runs = [run for runs in load_zoo_results(store).values() for run in runs if run["role"] == "seen"]
    if not runs:
        return None
    return {
        "runs": len(runs),
        "seconds_per_run": statistics.fmean(run["seconds"] for run in runs),
        "checkpoints_per_run": statistics.fmean(len(run["checkpoints"]) for run in runs),
    }


def run(store_path: str, full: bool) -> dict:
    torch.set_num_threads(1)
    source = Store(store_path)
    default = LoraLayout.from_dict(source.manifest["components"]["lora"])
    ranks_blocks = [(1, 3), (2, 6), (64, 6)]
    zoo_sizes = [200, 3200]
    scale, repeats = 1, 5
    if full:
        ranks_blocks = [(2, 1), (1, 3), (2, 3), (2, 6), (8, 6), (16, 6), (32, 6), (64, 6), (128, 6)]
        zoo_sizes = [200, 800, 3200, 12800]
        scale, repeats = 4, 20
    layouts = [LoraLayout(rank=r, alpha=2.0 * r, blocks=b) for r, b in ranks_blocks]
    adapter = [measure_point(source, layout, 800, scale, repeats) for layout in layouts]
    zoo = [measure_point(source, default, n, scale, repeats) for n in zoo_sizes]

    return {
        "threads": 1,
        "steps": DEFAULT_STEPS,
        "adapter_size": adapter,
        "zoo_size": zoo,
        "zoo_load_ms_per_checkpoint": zoo_load_ms(source),
        "zoo_collection": zoo_collection(source),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True, help="a store with a backbone (its zoo is timed when present)")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    result = run(args.store, args.full)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "growth.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
