"""An adapter by fine-tuning vs an adapter by generation, side by side in one process; DDIM steps vs time vs
accuracy; raw backbone throughput; a profile of one generation.

    python -m bench.adaptation --data data/demo --store model_store/demo [--full] [--out bench/results]

Fine-tuning: per location, `training.zoo.finetune` with the zoo's own config (optimiser, lr, batch) from the
same pretrained backbone, checking val accuracy every `check_every` steps and stopping as soon as it reaches
the zoo's recorded mean checkpoint val accuracy of that location (the target). Its seconds exclude the val
checks and data loading; the adapter it stopped with is then scored on test.

Generation: from the location's first held-out background frame (the frame evaluation conditions on) to an
adapter state dict (`Generator.generate`: embedding, DDIM, decoding), at batch 1 and per adapter at batch 64.
Accuracy is the mean test accuracy of `samples` seeds. Both sides run on one torch thread (as the zoo
workers and `wildpdiff evaluate` do). Steps are chosen on val, never on test.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image

from app.images import decode_image
from app.settings import Settings
from bench.measure import clock, load_average
from model_store.backbone import normalize, to_uint8
from model_store.condition import ConditionEncoder
from model_store.generator import Generator
from model_store.lora import adapted_logits, adapter_accuracy, unflatten
from model_store.store import Store
from model_store.vae import ParameterVAE
from training.data import CCTDataset, DatasetSpec, read_dataset
from training.evaluation.targets import fresh_frame
from training.zoo import ZooConfig, finetune, load_zoo_results

CHECK_EVERY = 5  # fine-tuning steps between val checks: the target is met at most 4 steps late
DEFAULT_STEPS = Settings.model_fields["default_steps"].default  # what the service uses when a request names none


@dataclass
class Location:
    name: str
    role: str
    frame: Image.Image
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    target_val_acc: float  # the zoo's mean checkpoint val accuracy here
    zoo_test_acc: float  # the zoo's mean checkpoint test accuracy here
    zoo_run_seconds: float  # the zoo's mean recorded seconds per run (fixed steps, val+test scoring included)


def accuracy(g: Generator, state: dict[str, torch.Tensor], frames: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Test or val accuracy of an adapter: (uint8 pixels, labels) of one location."""
    return adapter_accuracy(g.classifier, state, g.layout, normalize(frames[0], g.backbone_config), frames[1])


def pick(names: list[str], count: int | None) -> list[str]:
    """`count` names spread evenly over the list (all if None)."""
    if count is None or count >= len(names):
        return names
    return [names[i * len(names) // count] for i in range(count)]


def load_locations(dataset: CCTDataset, store: Store, size: int, counts: dict[str, int | None]) -> list[Location]:
    results = load_zoo_results(store)
    locations = []
    for role, count in counts.items():
        for name in pick([n for n in dataset.locations(role) if n in results], count):
            checkpoints = [c for run in results[name] for c in run["checkpoints"]]
            locations.append(
                Location(
                    name,
                    role,
                    fresh_frame(dataset, name)[1],
                    *(dataset.load(name, split, size) for split in ("train", "val", "test")),
                    target_val_acc=statistics.fmean(c["val_acc"] for c in checkpoints),
                    zoo_test_acc=statistics.fmean(c["test_acc"] for c in checkpoints),
                    zoo_run_seconds=statistics.fmean(run["seconds"] for run in results[name]),
                )
            )
    return locations


# -----------------------------------------------------------------------------
# fine-tuning until the zoo's accuracy


class Reached(Exception):
    """Raised from the checkpoint callback to stop `finetune` at the target."""

    def __init__(self, step: int, state: dict[str, torch.Tensor]):
        self.step, self.state = step, state


def finetune_to_target(
    g: Generator, zoo: ZooConfig, location: Location, seed: int, check_every: int, max_steps: int
) -> dict:
    # No warm-up: check from step `check_every` on, every `check_every` steps, up to `max_steps`.
    config = replace(zoo, warmup_steps=0, interval=check_every, checkpoints=max_steps // check_every)
    checks: list[tuple[int, float]] = []
    check_seconds = check_cpu = 0.0

    def check(step: int, state: dict[str, torch.Tensor]) -> None:
        nonlocal check_seconds, check_cpu
        wall, cpu = time.perf_counter(), time.process_time()
        acc = accuracy(g, state, location.val)
        check_seconds += time.perf_counter() - wall
        check_cpu += time.process_time() - cpu
        checks.append((step, acc))
        if acc >= location.target_val_acc:
            raise Reached(step, state)

    load_before = load_average()
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        state = finetune(g.classifier, g.backbone_config, g.layout, config, location.train, seed, check)
        step, reached = checks[-1][0], False
    except Reached as stop:
        state, step, reached = stop.state, stop.step, True
    seconds = time.perf_counter() - wall - check_seconds
    cpu_seconds = time.process_time() - cpu - check_cpu
    return {
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "steps": step,
        "reached": reached,
        "target_val_acc": location.target_val_acc,
        "val_acc": checks[-1][1],
        "test_acc": accuracy(g, state, location.test),
        "load_before": load_before,
        "load_after": load_average(),
    }


# -----------------------------------------------------------------------------
# generation: accuracy and time per DDIM step count


def generated_accuracy(g: Generator, location: Location, steps: int, samples: int) -> dict:
    features = g.embed([location.frame]).repeat(samples, 1)
    vectors = g.generate_vectors(features, seeds=list(range(samples)), steps=steps)
    states = [unflatten(v, g.shapes) for v in vectors]
    val = [accuracy(g, s, location.val) for s in states]
    test = [accuracy(g, s, location.test) for s in states]
    return {"val_acc": statistics.fmean(val), "test_acc": statistics.fmean(test), "test_min": min(test)}


def generation_seconds(g: Generator, frame: Image.Image, steps: int, repeats: int, batch: int) -> dict:
    """Median seconds per adapter over `repeats` calls of `Generator.generate` with `batch` frames."""
    g.generate([frame] * batch, seeds=list(range(batch)), steps=steps)  # warm-up
    seconds = []
    load_before = load_average()
    for r in range(repeats):
        start = time.perf_counter()
        g.generate([frame] * batch, seeds=list(range(r * batch, (r + 1) * batch)), steps=steps)
        seconds.append((time.perf_counter() - start) / batch)
    return {"seconds": statistics.median(seconds), "load_before": load_before, "load_after": load_average()}


def recommend_steps(rows: list[dict], reference: int, tolerance: float) -> int:
    """The fewest steps whose mean VAL accuracy is within `tolerance` of the `reference` step count's."""
    by_steps = {row["steps"]: row["val_acc"] for row in rows}
    return min(s for s, acc in by_steps.items() if acc >= by_steps[reference] - tolerance)


# -----------------------------------------------------------------------------
# where the time of one generation goes


def profile_generation(g: Generator, frame: Image.Image, steps: int, repeats: int, out: Path) -> dict:
    """cProfile of `repeats` batch-1 generations -> shares of the named parts; the top of cProfile's
    table and torch.profiler's operator table go to `out`."""
    profiler = cProfile.Profile()
    profiler.enable()
    for seed in range(repeats):
        g.generate([frame], seeds=seed, steps=steps)
    profiler.disable()
    stats = pstats.Stats(profiler)
    cumulative = {key[:3]: value[3] for key, value in stats.stats.items()}  # (file, line, name) -> seconds

    def seconds(function) -> float:
        code = function.__code__
        return cumulative.get((code.co_filename, code.co_firstlineno, code.co_name), 0.0)

    total = seconds(Generator.generate)
    parts = {
        "condition_embedding": seconds(ConditionEncoder.embed),
        "scheduler_setup": seconds(DDIMScheduler.from_config.__func__) + seconds(DDIMScheduler.set_timesteps),
        "denoiser_forward": seconds(type(g.denoiser).forward),
        "scheduler_step": seconds(DDIMScheduler.step),
        "vae_decode": seconds(ParameterVAE.decode),
    }
    parts["other"] = total - sum(parts.values())

    text = io.StringIO()
    stats.stream = text
    text.write(f"cProfile: {repeats} x Generator.generate, batch 1, {steps} DDIM steps, 1 thread\n\n")
    stats.sort_stats("tottime").print_stats(25)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        g.generate([frame], seeds=0, steps=steps)
    text.write(f"\ntorch.profiler: 1 x Generator.generate, batch 1, {steps} DDIM steps\n\n")
    text.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    out.write_text(text.getvalue())
    return {
        "steps": steps,
        "repeats": repeats,
        "ms_per_generation_profiled": round(1000 * total / repeats, 2),
        "share": {name: round(value / total, 3) for name, value in parts.items()},
        "table": out.name,
    }


# -----------------------------------------------------------------------------
# raw backbone throughput (no HTTP)


@torch.inference_mode()
def backbone_throughput(g: Generator, pixels: torch.Tensor, adapter: dict | None, batch: int, seconds: float) -> dict:
    """Images/s of classifying uint8 frames in batches (normalise, forward, softmax), as `/classify` does
    after decoding: with `adapter` through `adapted_logits`, else the plain backbone."""
    batch_pixels = pixels[:batch]

    def once() -> None:
        x = normalize(batch_pixels, g.backbone_config)
        logits = g.classifier(x) if adapter is None else adapted_logits(g.classifier, adapter, g.layout, x)
        logits.softmax(-1)

    once()  # warm-up
    load_before, count, start = load_average(), 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count < 5:
        once()
        count += 1
    return {
        "batch": batch,
        "images_per_s": round(batch * count / elapsed, 1),
        "load_before": load_before,
        "load_after": load_average(),
    }


def decode_ms(files: list[bytes], size: int, repeats: int = 20) -> float:
    """Median ms to turn uploaded files into the model's uint8 batch, as `/classify` does before the forward."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.stack([to_uint8(decode_image(data, "frame", 40_000_000), size) for data in files])
        seconds.append(time.perf_counter() - start)
    return round(1000 * statistics.median(seconds), 3)


# -----------------------------------------------------------------------------


def run(data: str, store_path: str, full: bool, out: Path, server_threads: int) -> dict:
    torch.set_num_threads(1)
    store = Store(store_path)
    dataset = read_dataset(DatasetSpec.of_store(data, store))
    g = Generator.from_store(store)
    zoo = ZooConfig(**store.manifest["components"]["zoo"])
    counts = {"seen": None, "interp": None, "unseen": None} if full else {"seen": 4, "interp": 1, "unseen": 1}
    samples = 10 if full else 4
    step_counts = sorted({2, 5, 10, 20, 50, 100, DEFAULT_STEPS} if full else {5, 10, 20, 50, DEFAULT_STEPS})
    repeats_1, repeats_64 = (30, 5) if full else (10, 2)
    locations = load_locations(dataset, store, g.backbone_config.image_size, counts)

    max_steps = 3 * (zoo.warmup_steps + zoo.checkpoints * zoo.interval)  # 3x a zoo run: ample to reach the target
    with clock() as finetune_clock:
        finetuned = {
            loc.name: finetune_to_target(g, zoo, loc, 1000 + i, CHECK_EVERY, max_steps)
            for i, loc in enumerate(locations)
        }
    with clock() as accuracy_clock:
        accuracy = {loc.name: {s: generated_accuracy(g, loc, s, samples) for s in step_counts} for loc in locations}
    frame = locations[0].frame
    with clock() as timing_clock:
        timing = {
            s: {
                "batch1": generation_seconds(g, frame, s, repeats_1, 1),
                "batch64": generation_seconds(g, frame, s, repeats_64, 64),
            }
            for s in step_counts
        }
    profile = profile_generation(g, frame, DEFAULT_STEPS, 10, out / "profile_generation.txt")

    seen = [loc for loc in locations if loc.role == "seen"]
    finetune_seconds = statistics.fmean(finetuned[loc.name]["seconds"] for loc in seen)
    finetune_test = statistics.fmean(finetuned[loc.name]["test_acc"] for loc in seen)
    steps_rows = []
    for s in step_counts:
        per_adapter_64, batch1 = timing[s]["batch64"]["seconds"], timing[s]["batch1"]["seconds"]
        generated_test = statistics.fmean(accuracy[loc.name][s]["test_acc"] for loc in seen)
        steps_rows.append(
            {
                "steps": s,
                "ms_batch1": round(1000 * batch1, 3),
                "ms_per_adapter_batch64": round(1000 * per_adapter_64, 4),
                "val_acc": statistics.fmean(accuracy[loc.name][s]["val_acc"] for loc in seen),
                "test_acc": generated_test,
                "accuracy_ratio": generated_test / finetune_test,
                "speedup_batch1": finetune_seconds / batch1,
                "speedup": finetune_seconds / per_adapter_64,
                "load": timing[s]["batch1"]["load_before"],
            }
        )
    headline = next(row for row in steps_rows if row["steps"] == DEFAULT_STEPS)

    # the HTTP comparison's reference: the adapted classifier at batch 16 on the server's thread count (and 1)
    adapter = unflatten(g.generate_vectors(g.embed([frame]), [0], DEFAULT_STEPS)[0], g.shapes)
    pixels = torch.cat([locations[0].test[0]] * 2)
    raw = {"server_threads": server_threads}
    for threads in sorted({1, server_threads}):
        torch.set_num_threads(threads)
        raw[f"threads{threads}"] = {
            "adapted_batch16": backbone_throughput(g, pixels, adapter, 16, 3.0),
            "plain_batch16": backbone_throughput(g, pixels, None, 16, 3.0),
            "adapted_batch1": backbone_throughput(g, pixels, adapter, 1, 2.0),
        }
    torch.set_num_threads(1)
    files = [item.file.read_bytes() for item in dataset.split(locations[0].name, "test")[:16]]
    raw["decode_batch16_ms"] = decode_ms(files, g.backbone_config.image_size)

    per_location = [
        {
            "location": loc.name,
            "role": loc.role,
            "finetune": finetuned[loc.name],
            "zoo_test_acc": loc.zoo_test_acc,
            "zoo_run_seconds": loc.zoo_run_seconds,
            "generated": {str(s): accuracy[loc.name][s] for s in step_counts},
        }
        for loc in locations
    ]
    roles = {}
    for role in counts:
        rows = [row for row in per_location if row["role"] == role]
        if rows:
            roles[role] = {
                "locations": len(rows),
                "finetune_test_acc": statistics.fmean(r["finetune"]["test_acc"] for r in rows),
                "zoo_test_acc": statistics.fmean(r["zoo_test_acc"] for r in rows),
                "generated_test_acc": statistics.fmean(r["generated"][str(DEFAULT_STEPS)]["test_acc"] for r in rows),
                "finetune_reached": sum(r["finetune"]["reached"] for r in rows),
            }
    return {
        "store_id": g.store_id,
        "threads": 1,
        "samples": samples,
        "default_steps": DEFAULT_STEPS,
        "finetune": {
            "seconds_mean_seen": finetune_seconds,
            "test_acc_mean_seen": finetune_test,
            "zoo_run_seconds_mean_seen": statistics.fmean(loc.zoo_run_seconds for loc in seen),
            "check_every": CHECK_EVERY,
            "clock": finetune_clock.to_dict(),
        },
        "generation": {
            "steps": DEFAULT_STEPS,
            "ms_batch1": headline["ms_batch1"],
            "ms_per_adapter_batch64": headline["ms_per_adapter_batch64"],
            "test_acc_mean_seen": headline["test_acc"],
            "accuracy_clock": accuracy_clock.to_dict(),
            "timing_clock": timing_clock.to_dict(),
        },
        "speedup": headline["speedup"],
        "speedup_batch1": headline["speedup_batch1"],
        "accuracy_ratio": headline["accuracy_ratio"],
        "accuracy_ratio_vs_zoo": headline["test_acc"] / statistics.fmean(loc.zoo_test_acc for loc in seen),
        "steps": steps_rows,
        "recommended_steps": recommend_steps(steps_rows, DEFAULT_STEPS, tolerance=0.005),
        "roles": roles,
        "per_location": per_location,
        "raw_backbone": raw,
        "profile": profile,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--full", action="store_true", help="every location, more samples and step counts")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args.data, args.store, args.full, out, torch.get_num_threads())
    (out / "adaptation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("per_location", "steps")}, indent=2))


if __name__ == "__main__":
    main()
