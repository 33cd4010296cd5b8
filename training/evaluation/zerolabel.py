"""Zero-label evaluation: what a location's unlabelled frames are worth (report.json `zerolabel`).

Per evaluated location (seen, interp, unseen) and per frame count in `frames`: draw that many frames of the
location's TRAIN split (pixels only: their labels are never read), and let `model_store.zerolabel` start from
the adapter the store serves without frames (the default) and, per option,

    off            keep the default (what serving without frames gives)
    select         choose among the default, the other methods, generated samples and the base model by the
                   information-maximisation loss on the frames (the default stays unless the gap is clear)
    adapt          adapt the default on the frames
    select+adapt   both

Per region of condition distance (the serving table's), the option with the best mean val accuracy at
`choose_at` frames is written into the serving table; "off" stays unless another beats it by `min_val_gain`.
The other frame counts are scored with the chosen options, and a region's option applies from the fewest
frames at and above which its val accuracy never falls below "off"'s (`min_frames`; fewer frames: off).
Rows, per role and frame count:

    acc, default_acc         test accuracy with the chosen options / without frames
    paired                   acc minus default_acc per location: mean and 95% bootstrap interval over locations
    gain_recovered           (acc - pretrain) / (finetuned - pretrain), on the role's means (as few-shot)
    regret                   best candidate's test accuracy minus that of the one chosen to start from (how
                             often label-free selection is wrong; reported, never used)
    seconds                  median time of one zero-label answer (candidates, choice, adaptation)
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass

import torch

from model_store.backbone import normalize
from model_store.inference import InferenceOptions, ServingTable, infer, zerolabel_candidates
from model_store.zerolabel import ZeroLabelConfig, zero_label
from training.data import CCTDataset
from training.evaluation.config import ZeroLabelEvalConfig
from training.evaluation.roles import paired_difference
from training.evaluation.scoring import Scorer
from training.evaluation.targets import Task

ROLES = {"seen": "rq1", "interp": "rq2", "unseen": "rq3"}
OPTIONS = ("off", "select", "adapt", "select+adapt")


def option_config(option: str, config: ZeroLabelEvalConfig) -> ZeroLabelConfig:
    # No time bound: a bound would make the evaluation depend on the machine's speed; seconds are reported.
    return ZeroLabelConfig(
        config.select_margin if "select" in option else None,
        config.steps if "adapt" in option else 0,
        lr=config.lr,
        diversity=config.diversity,
        max_seconds=math.inf,
    )


def draw_frames(dataset: CCTDataset, location: str, count: int, generator, seed: int) -> torch.Tensor:
    """Up to `count` random frames of the location's train split -> (N, 3, S, S) normalised; labels dropped."""
    pixels, _ = dataset.load(location, "train", generator.backbone_config.image_size)
    pick = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(seed))[:count]
    return normalize(pixels[pick], generator.backbone_config)


@dataclass
class Location:
    """One evaluated location: its default answer and the candidates a zero-label choice may pick from."""

    task: Task
    region: str
    candidates: dict[str, torch.Tensor]  # the default first
    candidates_seconds: float  # time to build the non-default candidates
    best_test: float  # the best candidate's test accuracy (for regret only)
    test_of: dict[str, float]  # candidate -> test accuracy


def prepare(generator, task: Task, table: ServingTable, threshold: float, steps: int, scorer: Scorer) -> Location:
    default = infer(generator, [task.frame], InferenceOptions(steps=steps), table=table, ood_threshold=threshold)
    with torch.inference_mode():
        condition, _ = generator.condition(generator.embed([task.frame]))
    start = time.perf_counter()
    others = zerolabel_candidates(generator, condition, 0, steps, table, exclude=default.method)
    seconds = time.perf_counter() - start
    candidates = {default.method: default.vector, **others}
    tests = scorer.accuracy(torch.stack(list(candidates.values())), task.test).tolist()
    test_of = dict(zip(candidates, tests, strict=True))
    return Location(task, default.region, candidates, seconds, max(tests), test_of)


def run_option(generator, location: Location, frames: torch.Tensor, option: str, config, scorer: Scorer) -> dict:
    """One location, frames and option -> val and test accuracy, regret, seconds."""
    if option == "off":
        vector, source, seconds = next(iter(location.candidates.values())), next(iter(location.candidates)), 0.0
    else:
        start = time.perf_counter()
        result = zero_label(generator, location.candidates, frames, option_config(option, config))
        seconds = time.perf_counter() - start + (location.candidates_seconds if "select" in option else 0.0)
        vector, source = result.vector, result.source
    val, test = (scorer.accuracy(vector[None], frames_).item() for frames_ in (location.task.val, location.task.test))
    return {"val": val, "test": test, "regret": location.best_test - location.test_of[source], "seconds": seconds}


def choose_options(by_location: list[tuple[Location, dict]], config) -> dict[str, str]:
    """region -> the option with the best mean val accuracy there ("off" unless beaten by `min_val_gain`)."""
    chosen = {}
    for region in sorted({location.region for location, _ in by_location}):
        inside = [results for location, results in by_location if location.region == region]
        means = {option: statistics.fmean(results[option]["val"] for results in inside) for option in OPTIONS}
        best = max(OPTIONS, key=means.get)
        chosen[region] = best if means[best] >= means["off"] + config.min_val_gain else "off"
    return chosen


def fewest_frames(by_count: dict[int, list[tuple[Location, dict]]], chosen: dict[str, str]) -> dict[str, int | None]:
    """region -> the fewest frames from which the chosen option's mean val accuracy is >= off's at every count
    measured; None when it falls below off's at the most frames measured (then the region serves off)."""
    fewest = {}
    for region, option in chosen.items():
        fewest[region] = None
        for count in sorted(by_count, reverse=True):
            inside = [results for location, results in by_count[count] if location.region == region]
            if statistics.fmean(r[option]["val"] for r in inside) < statistics.fmean(r["off"]["val"] for r in inside):
                break
            fewest[region] = count
    return fewest


def with_zerolabel(table: ServingTable, chosen: dict[str, str], fewest: dict[str, int], config) -> ServingTable:
    regions = []
    for region in table.regions:
        option = option_config(chosen.get(region.name, "off"), config)
        regions.append(
            dataclasses.replace(
                region,
                zerolabel_margin=option.select_margin,
                zerolabel_steps=option.steps,
                zerolabel_min_frames=fewest.get(region.name) or 1,
            )
        )
    return dataclasses.replace(table, regions=tuple(regions))


def evaluate_zerolabel(
    dataset: CCTDataset,
    generator,
    table: ServingTable,
    threshold: float,
    tasks: dict[str, list[Task]],
    sections: dict,
    steps: int,
    config: ZeroLabelEvalConfig,
    bootstrap: int = 2000,
) -> tuple[list[dict], ServingTable]:
    """-> (zerolabel rows, the serving table with each region's zero-label option chosen on val)."""
    scorer = Scorer(generator.classifier, generator.layout, generator.shapes)
    roles = {role: tasks.get(role, [])[: config.max_locations] for role in ROLES}
    locations = {
        role: [prepare(generator, task, table, threshold, steps, scorer) for task in role_tasks]
        for role, role_tasks in roles.items()
    }

    def results_at(count: int, options_for) -> dict[str, list[dict]]:
        """role -> per location {option: result} for the options `options_for(location)` names."""
        out = {}
        for role, role_locations in locations.items():
            out[role] = []
            for location in role_locations:
                frames = draw_frames(dataset, location.task.location, count, generator, config.seed)
                options = options_for(location)
                out[role].append(
                    {option: run_option(generator, location, frames, option, config, scorer) for option in options}
                )
        return out

    def pairs(results: dict[str, list[dict]]) -> list[tuple[Location, dict]]:
        return [pair for role in ROLES for pair in zip(locations[role], results[role], strict=True)]

    by_count = {config.choose_at: results_at(config.choose_at, lambda location: OPTIONS)}
    chosen = choose_options(pairs(by_count[config.choose_at]), config)
    for count in config.frames:
        if count != config.choose_at:
            by_count[count] = results_at(count, lambda location: ("off", chosen[location.region]))
    fewest = fewest_frames({count: pairs(results) for count, results in by_count.items()}, chosen)
    chosen = {region: "off" if fewest[region] is None else option for region, option in chosen.items()}

    def option_at(location: Location, count: int) -> str:
        needed = fewest[location.region]
        return chosen[location.region] if needed is not None and count >= needed else "off"

    rows = []
    for count in config.frames:
        results = by_count[count]
        for role, rq in ROLES.items():
            if not locations[role]:
                continue
            per_task = {row["task"]: row for row in sections[rq]["per_task"]}
            pretrain = statistics.fmean(per_task[loc.task.location]["pretrain_acc"] for loc in locations[role])
            finetuned = statistics.fmean(per_task[loc.task.location]["finetuned_acc"] for loc in locations[role])
            picked = [r[option_at(loc, count)] for loc, r in zip(locations[role], results[role], strict=True)]
            acc = statistics.fmean(r["test"] for r in picked)
            gain = finetuned - pretrain
            rows.append(
                {
                    "split": role,
                    "frames": count,
                    "acc": acc,
                    "default_acc": statistics.fmean(r["off"]["test"] for r in results[role]),
                    "paired": paired_difference(
                        [p["test"] - r["off"]["test"] for p, r in zip(picked, results[role], strict=True)],
                        bootstrap,
                        config.seed,
                    ),
                    "pretrain_acc": pretrain,
                    "finetuned_acc": finetuned,
                    "gain_recovered": (acc - pretrain) / gain if gain > 0 else float("nan"),
                    "regret": statistics.fmean(r["regret"] for r in picked),
                    "seconds": statistics.median(r["seconds"] for r in picked),
                    "locations": len(picked),
                    "options": {loc.region: option_at(loc, count) for loc in locations[role]},
                    "seconds_by_option": {
                        option: statistics.median(r[option]["seconds"] for r in results[role])
                        for option in OPTIONS
                        if all(option in r for r in results[role])
                    },
                    "val_acc": {
                        option: statistics.fmean(r[option]["val"] for r in results[role])
                        for option in OPTIONS
                        if all(option in r for r in results[role])
                    },
                }
            )
    return rows, with_zerolabel(table, chosen, fewest, config)
