"""One research question (a role's locations): generation beside every baseline, per location and on average.

For every location L of a role (seen = RQ1, interp = RQ2, unseen = RQ3) the condition is ONE fresh
background frame b of L: the first held-out frame of `model_store.condition.split_backgrounds`, never
seen by the generator. From b we sample `samples` adapters and score them beside the baselines of
`training.evaluation.baselines`, all built from the seen-location zoo only; the fine-tuned LoRAs of interp
and unseen locations are references and reach neither the generator nor a baseline.

Accuracies are on the test split. Every choice (which generated sample, which fine-tuned checkpoint,
knn_blend's k and weighting, the noise sigma) is made on the val split by `training.evaluation.scoring`;
knn_blend and noise hyperparameters are chosen once per role (mean val accuracy over the role's locations),
a generated sample per location.

Beside the baselines, each row carries `methods`: the val and test accuracy of what the service can serve
(`generate`, `nearest`, the store-wide `knn_blend` and `anchored` at every strength tried), from which
`training.evaluation.serving` chooses, on val, what the store serves.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from tqdm import tqdm

from training.evaluation import baselines
from training.evaluation.baselines import LocationIndex
from training.evaluation.config import EvalConfig
from training.evaluation.scoring import Frames, Scorer, best_on_val, choose_option, select_sample
from training.evaluation.targets import Task
from training.zoo import Zoo

KNN_SEPARATOR = ","


@dataclass
class Setup:
    """A generator and the seen zoo it learned from, with the baselines built from that zoo."""

    generator: object  # model_store.generator.Generator (embed, generate_vectors, distance)
    scorer: Scorer
    zoo: Zoo
    results: dict[str, list[dict]]  # every zoo run's result.json by location (seen runs and references)
    index: LocationIndex
    hypernet: baselines.Hypernet | None  # None when config.hypernet.steps == 0 (the studies skip it)
    typical_nn: float


def build_setup(generator, zoo: Zoo, results: dict, config: EvalConfig) -> Setup:
    """Retrieval and the hypernet use the generator's stored training-frame embeddings and z-scoring."""
    owner = torch.tensor([zoo.locations.index(generator.locations[i]) for i in generator.reference_locations.tolist()])
    index = LocationIndex(
        generator.references.float().cpu(),
        owner,
        generator.condition_mean.float().cpu(),
        generator.condition_std.float().cpu(),
    )
    return Setup(
        generator=generator,
        scorer=Scorer(generator.classifier, generator.layout, generator.shapes),
        zoo=zoo,
        results=results,
        index=index,
        hypernet=baselines.fit_hypernet(index, zoo, config.hypernet) if config.hypernet.steps else None,
        typical_nn=baselines.typical_nn_distance(zoo),
    )


# -----------------------------------------------------------------------------
# knn_blend options: (k, weighting) by name


def knn_options(config: EvalConfig) -> dict[str, tuple[int, str]]:
    weightings = config.knn_weightings
    return {
        f"k={k}{KNN_SEPARATOR}{w}": (k, w)
        for k in config.knn_ks
        for w in weightings
        if k > 1 or w == weightings[0]  # one neighbour: the weighting does not matter
    }


def choose_knn(setup: Setup, tasks: list[Task], config: EvalConfig) -> str:
    """The knn_blend option with the best mean val accuracy over `tasks` (one choice for all of them)."""
    distances = [setup.index.distances(f) for f in setup.generator.embed([t.frame for t in tasks]).float().cpu()]
    options = {
        name: [baselines.knn_blend(setup.zoo, d, k, w)[None] for d in distances]
        for name, (k, w) in knn_options(config).items()
    }
    return choose_option(setup.scorer, options, [t.val for t in tasks])


def anchored_samples(
    setup: Setup, features: torch.Tensor, anchors: torch.Tensor, strength: float, samples: int, steps: int
) -> torch.Tensor:
    """(T, D) conditions, (T, P) blends -> (T, samples, P): DDIM started from each blend noised to `strength`."""
    n = samples
    vectors = setup.generator.generate_vectors(
        features.repeat_interleave(n, 0),
        seeds=[s for _ in range(len(features)) for s in range(n)],
        steps=steps,
        anchor=anchors.repeat_interleave(n, 0),
        strength=strength,
    )
    return vectors.float().cpu().view(len(features), n, -1)


# -----------------------------------------------------------------------------
# one role


def evaluate_role(
    setup: Setup, tasks: list[Task], config: EvalConfig, serving_knn: str | None = None, progress: bool = False
) -> tuple[dict, dict[str, torch.Tensor]]:
    """-> ({per_task, summary, selection}, {location: generated (samples, P) adapters}).

    `serving_knn`: the store-wide knn_blend option (`choose_knn`) that the served methods start from; None:
    no `methods` per row (the studies)."""
    if not tasks:
        return {"per_task": [], "summary": {}, "selection": {}}, {}
    zoo, scorer = setup.zoo, setup.scorer
    features = setup.generator.embed([t.frame for t in tasks]).float().cpu()
    distances = [setup.index.distances(f) for f in features]
    nearest = [zoo.locations[int(d.argmin())] for d in distances]
    n = config.samples
    seeds = [s for _ in tasks for s in range(n)]
    generated = setup.generator.generate_vectors(features.repeat_interleave(n, 0), seeds=seeds, steps=config.steps)
    generated = generated.float().cpu().view(len(tasks), n, -1)

    # Hyperparameters of the baselines: one choice per role, on val.
    vals = [t.val for t in tasks]
    knn = {
        name: [baselines.knn_blend(zoo, d, k, w)[None] for d in distances]
        for name, (k, w) in knn_options(config).items()
    }
    knn_choice = choose_option(scorer, knn, vals)
    rng = torch.Generator().manual_seed(config.seed)
    noise_options = {
        f"{sigma:g}": [baselines.noise(zoo, loc, sigma, config.baseline_samples, rng) for loc in nearest]
        for sigma in config.noise_sigmas
    }
    sigma_choice = choose_option(scorer, noise_options, vals)
    served = served_candidates(setup, features, knn[serving_knn], generated, config) if serving_knn else None

    per_task = []
    for i, task in enumerate(tqdm(tasks, desc=tasks[0].role, unit="location", leave=False, disable=not progress)):
        candidates = {
            "average": baselines.average(zoo)[None],
            "nearest": baselines.nearest(zoo, distances[i])[None],
            "knn_blend": knn[knn_choice][i],
            "noise": noise_options[sigma_choice][i],
            "gaussian": baselines.gaussian(zoo, nearest[i], config.baseline_samples, rng),
        }
        if setup.hypernet is not None:
            candidates["hypernet"] = setup.hypernet(features[i][None])
        if task.sources and set(task.sources) <= set(zoo.locations):  # scaling subsets may lack a source
            candidates["midpoint"] = baselines.midpoint(zoo, *task.sources)[None]
        row = {"task": task.location, "frame": task.frame_name, "nearest_location": nearest[i]}
        if task.similarity:
            row["similarity"] = task.similarity
        row["condition_distance"] = float(setup.generator.distance(features[i][None])[0])
        row |= task_scores(setup, task, generated[i], candidates, config)
        if served is not None:
            methods = {name: adapters[i] for name, adapters in served.items()}
            methods["nearest"] = candidates["nearest"]
            row["methods"] = {
                name: {split: float(scorer.accuracy(v, frames).mean()) for split, frames in splits(task).items()}
                for name, v in methods.items()
            }
        per_task.append(row)
    result = {"per_task": per_task, **summarise_role(per_task, config)}
    result["selection"] = {"knn_blend": knn_choice, "noise_sigma": float(sigma_choice)}
    return result, {task.location: g for task, g in zip(tasks, generated, strict=True)}


def splits(task: Task) -> dict[str, Frames]:
    return {"val": task.val, "test": task.test}


def served_candidates(
    setup: Setup, features: torch.Tensor, blends: list[torch.Tensor], generated: torch.Tensor, config: EvalConfig
) -> dict[str, torch.Tensor]:
    """What the service can serve each location, by method name -> (T, A, P): generate, knn_blend (the
    store-wide option) and anchored at every strength tried (`anchored@<strength>`)."""
    anchors = torch.cat(blends)  # (T, P)
    methods = {"generate": generated, "knn_blend": anchors[:, None]}
    for strength in config.anchored.strengths:
        methods[f"anchored@{strength:g}"] = anchored_samples(
            setup, features, anchors, strength, config.anchored.samples, config.steps
        )
    return methods


def task_scores(
    setup: Setup, task: Task, generated: torch.Tensor, candidates: dict[str, torch.Tensor], config: EvalConfig
) -> dict:
    """Test accuracies of one location: pretrained, fine-tuned references, generated, baselines; novelty."""
    scorer = setup.scorer
    wrong = scorer.wrong(generated, task.test)
    accs = 1.0 - wrong.double().mean(1)
    checkpoints = [c for run in task.references for c in run["checkpoints"]]
    best = checkpoints[best_on_val([c["val_acc"] for c in checkpoints])] if checkpoints else None
    return {
        "pretrain_acc": float(scorer.accuracy(torch.zeros_like(generated[:1]), task.test)[0]),
        "finetuned_acc": statistics.fmean(c["test_acc"] for c in checkpoints) if checkpoints else None,
        "finetuned_best_acc": best["test_acc"] if best else None,
        "generated_acc": float(accs.mean()),
        "generated_selected_acc": float(accs[select_sample(scorer, generated, task.val)]),
        "baselines": {name: float(scorer.accuracy(v, task.test).mean()) for name, v in candidates.items()},
        "novelty": novelty(setup, generated, wrong, task.test, config),
    }


def novelty(setup: Setup, generated: torch.Tensor, wrong: torch.Tensor, test: Frames, config: EvalConfig) -> dict:
    """max_iou against the training checkpoints nearest in weight space (where the highest IoU lies), and
    nn_l2_ratio against the typical distance between neighbouring training checkpoints; means over samples."""
    zoo = setup.zoo
    d = torch.cdist(generated / zoo.scale, zoo.vectors / zoo.scale)
    neighbours = d.topk(min(config.iou_neighbours, d.shape[1]), largest=False).indices.flatten().unique()
    training_wrong = setup.scorer.wrong(zoo.vectors[neighbours], test)
    return {
        "max_iou": float(baselines.max_iou(wrong, training_wrong).mean()),
        "nn_l2_ratio": float(baselines.nn_l2_ratio(generated, zoo, setup.typical_nn).mean()),
    }


# -----------------------------------------------------------------------------
# means over a role's locations, and paired differences to knn_blend


def summarise(rows: list[dict]) -> dict:
    """Means of every numeric field over the rows, nested dicts included; fields missing everywhere are None."""
    summary = {}
    keys = dict.fromkeys(key for row in rows for key in row)  # every row's keys, in first-seen order
    for key in keys:
        value = next(row[key] for row in rows if key in row)
        if isinstance(value, dict):
            summary[key] = summarise([row[key] for row in rows if key in row])
        elif isinstance(value, int | float) or value is None:
            values = [row[key] for row in rows if row.get(key) is not None]
            summary[key] = statistics.fmean(values) if values else None
    return summary


def method_values(row: dict) -> dict[str, float]:
    """A row's test accuracy per method name, as the paired comparison names them."""
    values = dict(row["baselines"])
    for field in ("generated_acc", "generated_selected_acc", "anchored_acc", "served_acc", "finetuned_acc"):
        if row.get(field) is not None:
            values[field.removesuffix("_acc")] = row[field]
    return values


def paired(rows: list[dict], config: EvalConfig, against: str = "knn_blend") -> dict[str, dict]:
    """Per method: mean paired difference to `against` over the rows' locations and its 95% confidence interval
    (percentile bootstrap over locations, seeded): {"diff": d, "ci95": [low, high], "locations": n}."""
    values = [method_values(row) for row in rows]
    out = {}
    for name in dict.fromkeys(name for v in values for name in v):
        pairs = [(v[name], v[against]) for v in values if name in v and against in v and name != against]
        if not pairs:
            continue
        out[name] = paired_difference([a - b for a, b in pairs], config.bootstrap, config.seed)
    return out


def paired_difference(diffs: list[float], resamples: int, seed: int) -> dict:
    """Per-location differences -> {"diff": mean, "ci95": [low, high], "locations": n} (percentile bootstrap
    over locations, seeded)."""
    values = torch.tensor(diffs, dtype=torch.float64)
    picks = torch.randint(len(values), (resamples, len(values)), generator=torch.Generator().manual_seed(seed))
    low, high = torch.quantile(values[picks].mean(1), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"diff": float(values.mean()), "ci95": [low, high], "locations": len(values)}


def summarise_role(per_task: list[dict], config: EvalConfig) -> dict:
    """{summary, by_similarity (interp)}; the summary includes the paired differences to knn_blend."""
    rows = [{key: value for key, value in row.items() if key != "methods"} for row in per_task]
    result = {"summary": summarise(rows) | {"paired": paired(rows, config)}}
    if any(row.get("similarity") for row in rows):  # RQ2: the paper finds interpolation works only for similar pairs
        result["by_similarity"] = {
            level: summarise([row for row in rows if row.get("similarity") == level])
            for level in sorted({row["similarity"] for row in rows if row.get("similarity")})
        }
    return result
