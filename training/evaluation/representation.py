"""Task representation: how the condition is formed, against accuracy (report.json `representation`).

One background frame is a weak description of a location: a night-infrared frame names its location far
less surely than a daytime one. Per role (seen, interp, unseen) this measures, with the store's generator,
what a request with several frames gains, on the val and the test split (`DEFAULT_FRAME_RULE` was chosen on
val):

- `1 frame`: the first held-out frame, as the RQ sections use;
- `K frames, closest` / `K frames, mean`: the first K held-out frames combined by `Generator.condition`;
- `night frame` / `night + K day frames`: on locations with a night-infrared held-out frame, that frame
  alone against it together with the first K daytime frames (default rule), i.e. a request with day and night.

Each row is the mean over locations of the mean accuracy of `samples` adapters (seeds 0..samples-1).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from model_store.condition import is_night
from model_store.generator import DEFAULT_FRAME_RULE, FRAME_RULES
from training.data import CCTDataset
from training.evaluation.config import RepresentationConfig
from training.evaluation.scoring import Scorer
from training.evaluation.targets import held_out_frames


@dataclass
class Variant:
    name: str
    frames: int  # background frames per request
    rule: str  # Generator.condition's rule


def variants(config: RepresentationConfig) -> list[Variant]:
    k = config.frames
    several = [Variant(f"{k} frames, {rule}", k, rule) for rule in FRAME_RULES]
    return [Variant("1 frame", 1, DEFAULT_FRAME_RULE), *several]


def evaluate_representation(
    dataset: CCTDataset, generator, tasks: dict, steps: int, config: RepresentationConfig
) -> list[dict]:
    """`tasks`: role -> that role's `Task`s (`training.evaluation.targets`, with val and test frames) -> report rows."""
    scorer = Scorer(generator.classifier, generator.layout, generator.shapes)
    seeds = list(range(config.samples))

    def accuracy(features: torch.Tensor, rule: str, task) -> tuple[float, float]:
        condition, _ = generator.condition(features, rule)
        vectors = generator.generate_vectors(condition.repeat(len(seeds), 1), seeds, steps).float()
        return scorer.accuracy(vectors, task.val).mean().item(), scorer.accuracy(vectors, task.test).mean().item()

    rows = []
    for role, role_tasks in tasks.items():
        role_tasks = role_tasks[: config.max_locations]
        if not role_tasks:
            continue
        frames = {task.location: held_out_frames(dataset, task.location) for task in role_tasks}
        features = {location: generator.embed(images) for location, images in frames.items()}
        for variant in variants(config):
            scores = [accuracy(features[t.location][: variant.frames], variant.rule, t) for t in role_tasks]
            rows.append(row(role, variant, scores))

        # day and night: locations whose held-out frames include a night-infrared one
        night_scores, mixed_scores = [], []
        for task in role_tasks:
            night = [i for i, image in enumerate(frames[task.location]) if is_night(image)]
            day = [i for i in range(len(frames[task.location])) if i not in night][: config.frames]
            if not night or not day:
                continue
            f = features[task.location]
            night_scores.append(accuracy(f[night[:1]], DEFAULT_FRAME_RULE, task))
            mixed_scores.append(accuracy(f[night[:1] + day], DEFAULT_FRAME_RULE, task))
        if night_scores:
            rows.append(row(role, Variant("night frame", 1, DEFAULT_FRAME_RULE), night_scores))
            mixed = Variant(f"night + {config.frames} day frames", config.frames + 1, DEFAULT_FRAME_RULE)
            rows.append(row(role, mixed, mixed_scores))
    return rows


def row(role: str, variant: Variant, scores: list[tuple[float, float]]) -> dict:
    return {
        "role": role,
        "variant": variant.name,
        "frames": variant.frames,
        "rule": variant.rule,
        "val_acc": statistics.fmean(val for val, _ in scores),
        "test_acc": statistics.fmean(test for _, test in scores),
        "locations": len(scores),
    }
