"""Two signals beside accuracy: how well the condition distance tells unseen locations apart, and speed."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

from PIL import Image

from model_store.condition import split_backgrounds
from training.data import CCTDataset
from training.evaluation.targets import read_frames


def auroc(negatives: Sequence[float], positives: Sequence[float]) -> float | None:
    """Probability that a positive scores above a negative (ties count half): Mann-Whitney U / (n m)."""
    if not negatives or not positives:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in positives for q in negatives)
    return wins / (len(positives) * len(negatives))


def ood_auroc(dataset: CCTDataset, generator) -> float | None:
    """How well `Generator.distance` separates unseen locations' frames from seen locations' fresh frames."""

    def distances(role: str) -> list[float]:
        paths = [p for loc in dataset.locations(role) for p in split_backgrounds(dataset.backgrounds(loc))[1]]
        if not paths:
            return []
        return generator.distance(generator.embed(read_frames(paths))).float().cpu().tolist()

    return auroc(distances("seen"), distances("unseen"))


def timing(generator, frame: Image.Image, results: dict, steps: int, repeats: int) -> dict:
    """Seconds of one fine-tuning run (zoo records, seen locations) vs one generated adapter (batch 1)."""
    runs = [run["seconds"] for location_runs in results.values() for run in location_runs if run["role"] == "seen"]
    generator.generate([frame], seeds=0, steps=steps)  # warm-up
    seconds = []
    for seed in range(repeats):
        start = time.perf_counter()
        generator.generate([frame], seeds=seed, steps=steps)
        seconds.append(time.perf_counter() - start)
    finetune, generate = statistics.fmean(runs), statistics.median(seconds)
    return {
        "finetune_seconds_per_task": finetune,
        "generate_seconds_per_adapter": generate,
        "speedup": finetune / generate,
    }
