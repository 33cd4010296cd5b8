"""Stage 4: evaluation, the paper's three questions with baselines -> STORE/report/ (DESIGN.md section 8).

    wildpdiff evaluate --data data/demo --store model_store/demo [--ablation] [--scaling]

For every location L of a role (seen = RQ1, interp = RQ2, unseen = RQ3) the condition is ONE fresh
background frame b of L: the first held-out frame of `model_store.condition.split_backgrounds`, never
seen by the generator. From b we sample `samples` adapters and score them beside the baselines of
`training.baselines`, all built from the seen-location zoo only; the fine-tuned LoRAs of interp and
unseen locations are references and reach neither the generator nor a baseline.

Accuracies are on the test split. Every choice (which generated sample, which fine-tuned checkpoint,
knn_blend's k and weighting, the noise sigma) is made on the val split by `select_sample`,
`best_on_val` and `choose_option`; they refuse test frames, and tests check that perturbing test
labels changes no choice. knn_blend and noise hyperparameters are chosen once per role (mean val
accuracy over the role's locations), a generated sample per location.

Beside the RQs, the report holds few-shot adaptation (`training.fewshot`) and what several background
frames per request change (`training.representation`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from tqdm import tqdm

from model_store.backbone import BackboneConfig, Classifier, normalize
from model_store.condition import split_backgrounds
from model_store.generator import DEFAULT_STEPS
from model_store.lora import LoraLayout, adapted_logits, flatten, unflatten
from model_store.ood import load_fallback
from model_store.store import Store
from training import baselines
from training.baselines import HypernetConfig, LocationIndex, Zoo
from training.data import CCTDataset, read_image
from training.fewshot import ROLES as FEWSHOT_ROLES
from training.fewshot import FewShotEvalConfig, evaluate_fewshot
from training.representation import RepresentationConfig, evaluate_representation

if TYPE_CHECKING:
    from training.profiles import Profile

REPORT = "report"
ROLES = {"rq1": "seen", "rq2": "interp", "rq3": "unseen"}


@dataclass
class AblationConfig:
    """`--ablation`: the paper's saving interval, each with its own zoo and generator (`training.studies`)."""

    intervals: tuple[int, ...] = (1, 10, 100)
    locations: int = 8  # the first n seen locations; fewer than the main run, to keep it affordable
    runs: int = 1  # runs per location: the interval is then the only source of checkpoint diversity
    vae_steps: int = 1500
    denoiser_steps: int = 2000
    samples: int = 5


@dataclass
class ScalingConfig:
    """`--scaling`: RQ2/RQ3 as the number of seen locations grows; random subsets of the main zoo."""

    sizes: tuple[int, ...] = (8, 16, 32, 40)
    seeds: tuple[int, ...] = (0, 1, 2)  # subset and fit seed
    vae_steps: int = 1000
    denoiser_steps: int = 1500
    samples: int = 5


@dataclass
class EvalConfig:
    samples: int = 10  # generated adapters per location (seeds 0..samples-1)
    steps: int = DEFAULT_STEPS  # DDIM steps per generated adapter, as the service uses
    baseline_samples: int = 5  # draws of the noise and gaussian baselines per location
    knn_ks: tuple[int, ...] = (1, 2, 3, 4, 8)
    knn_weightings: tuple[str, ...] = ("uniform", "inverse_distance")
    noise_sigmas: tuple[float, ...] = (0.1, 0.3, 1.0)  # z-score units of the zoo's coordinates
    iou_neighbours: int = 8  # per generated adapter, its nearest training checkpoints that max_iou compares with
    timing_repeats: int = 5
    seed: int = 0
    hypernet: HypernetConfig = field(default_factory=HypernetConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    fewshot: FewShotEvalConfig = field(default_factory=FewShotEvalConfig)
    representation: RepresentationConfig = field(default_factory=RepresentationConfig)


# -----------------------------------------------------------------------------
# labelled frames and batched scoring of flat adapters


@dataclass(frozen=True)
class Frames:
    """One location's labelled frames of one split, normalised once."""

    location: str
    split: str  # "val" | "test"
    pixels: torch.Tensor
    labels: torch.Tensor


def load_frames(dataset: CCTDataset, location: str, split: str, backbone: BackboneConfig) -> Frames:
    pixels, labels = dataset.load(location, split, backbone.image_size)
    return Frames(location, split, normalize(pixels, backbone), labels)


class Scorer:
    """Accuracy of many flat adapters on a location's frames: one batched forward per adapter, no PEFT."""

    def __init__(self, classifier: Classifier, layout: LoraLayout, shapes: dict[str, tuple[int, ...]]):
        self.classifier, self.layout, self.shapes = classifier, layout, shapes

    @torch.no_grad()
    def wrong(self, vectors: torch.Tensor, frames: Frames) -> torch.Tensor:
        """(A, P) adapters -> (A, N) bool: which frames each adapter gets wrong."""
        rows = []
        for vector in vectors:
            logits = adapted_logits(self.classifier, unflatten(vector, self.shapes), self.layout, frames.pixels)
            rows.append(logits.argmax(-1) != frames.labels)
        return torch.stack(rows) if rows else torch.zeros((0, len(frames.labels)), dtype=torch.bool)

    def accuracy(self, vectors: torch.Tensor, frames: Frames) -> torch.Tensor:
        """(A, P) -> (A,) accuracies."""
        return 1.0 - self.wrong(vectors, frames).double().mean(1)


# -----------------------------------------------------------------------------
# selection: the only code that chooses anything, and it only ever sees val


def _require_val(frames: Frames) -> None:
    if frames.split != "val":
        raise ValueError(f"selection must use val frames, got the {frames.split!r} split of {frames.location}")


def select_sample(scorer: Scorer, candidates: torch.Tensor, val: Frames) -> int:
    """Index of the candidate adapter with the best val accuracy (first on ties)."""
    _require_val(val)
    return int(scorer.accuracy(candidates, val).argmax())


def best_on_val(val_accs: Sequence[float]) -> int:
    """Index of the fine-tuned checkpoint with the best recorded val accuracy (first on ties)."""
    return max(range(len(val_accs)), key=lambda i: (val_accs[i], -i))


def choose_option(scorer: Scorer, options: dict[str, list[torch.Tensor]], vals: list[Frames]) -> str:
    """The option whose adapters score the best mean val accuracy over a role's locations.

    `options[name][i]` holds the (A, P) adapters that option gives location i (mean over the A)."""
    for val in vals:
        _require_val(val)

    def score(name: str) -> float:
        return statistics.fmean(
            float(scorer.accuracy(adapters, val).mean()) for adapters, val in zip(options[name], vals, strict=True)
        )

    return max(options, key=score)  # first listed option wins ties


# -----------------------------------------------------------------------------
# what one evaluation reads


@dataclass
class Task:
    """One target location: its condition frame, labelled splits and fine-tuned references."""

    location: str
    role: str
    frame_name: str
    frame: Image.Image  # the fresh background frame b: the condition for generator and baselines
    val: Frames
    test: Frames
    references: list[dict]  # zoo runs fine-tuned at this location (result.json); for comparison only
    sources: tuple[str, str] | None = None  # interp: the two seen locations it mixes
    similarity: str | None = None  # interp: "high" | "low", how alike the two sources are


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


def load_zoo(store: Store, shapes: dict[str, tuple[int, ...]], folder: str = "zoo") -> tuple[Zoo, dict]:
    """The seen locations' checkpoints of a store's zoo as a `Zoo`, and every run result by location."""
    from training.zoo import load_zoo_results

    results = load_zoo_results(store, folder)
    locations = sorted(loc for loc, runs in results.items() if runs[0]["role"] == "seen")
    vectors, owner = [], []
    for i, location in enumerate(locations):
        for run in results[location]:
            for checkpoint in run["checkpoints"]:
                vectors.append(flatten(store.load_tensors(checkpoint["file"]), shapes))
                owner.append(i)
    if not vectors:
        raise ValueError(f"{store.root / folder}: no seen-location checkpoints to evaluate against")
    return Zoo(locations, torch.stack(vectors), torch.tensor(owner)), results


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


def read_frames(paths: Sequence[Path]) -> list[Image.Image]:
    """Readable background frames, RGB; unreadable files are skipped, as everywhere else."""
    return [image.convert("RGB") for image in map(read_image, paths) if image is not None]


def fresh_frame(dataset: CCTDataset, location: str) -> tuple[str, Image.Image]:
    """The condition of a location: its first readable held-out background frame."""
    _, fresh = split_backgrounds(dataset.backgrounds(location))
    for path in fresh:
        image = read_image(path)
        if image is not None:
            return path.name, image.convert("RGB")
    raise ValueError(f"location {location!r} has no readable held-out background frame to condition on")


def load_tasks(dataset: CCTDataset, role: str, results: dict, backbone: BackboneConfig) -> list[Task]:
    tasks = []
    for location in dataset.locations(role):
        name, frame = fresh_frame(dataset, location)
        sources = dataset.tasks["interp_sources"].get(location) if role == "interp" else None
        tasks.append(
            Task(
                location=location,
                role=role,
                frame_name=name,
                frame=frame,
                val=load_frames(dataset, location, "val", backbone),
                test=load_frames(dataset, location, "test", backbone),
                references=results.get(location, []),
                sources=tuple(sources[:2]) if sources else None,
                similarity=sources[2] if sources and len(sources) > 2 else None,
            )
        )
    return tasks


# -----------------------------------------------------------------------------
# one role (RQ): generation, baselines, novelty per location, then means


def evaluate_role(
    setup: Setup, tasks: list[Task], config: EvalConfig, progress: bool = False
) -> tuple[dict, dict[str, torch.Tensor]]:
    """-> ({per_task, summary, selection}, {location: generated (samples, P) adapters})."""
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
    knn_options = {
        f"k={k},{w}": [baselines.knn_blend(zoo, d, k, w)[None] for d in distances]
        for k in config.knn_ks
        for w in config.knn_weightings
        if k > 1 or w == config.knn_weightings[0]  # one neighbour: the weighting does not matter
    }
    knn_choice = choose_option(scorer, knn_options, vals)
    rng = torch.Generator().manual_seed(config.seed)
    noise_options = {
        f"{sigma:g}": [baselines.noise(zoo, loc, sigma, config.baseline_samples, rng) for loc in nearest]
        for sigma in config.noise_sigmas
    }
    sigma_choice = choose_option(scorer, noise_options, vals)

    per_task = []
    for i, task in enumerate(tqdm(tasks, desc=tasks[0].role, unit="location", leave=False, disable=not progress)):
        candidates = {
            "average": baselines.average(zoo)[None],
            "nearest": baselines.nearest(zoo, distances[i])[None],
            "knn_blend": knn_options[knn_choice][i],
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
        per_task.append(row | task_scores(setup, task, generated[i], candidates, config))
    result = {
        "per_task": per_task,
        "summary": summarise(per_task),
        "selection": {"knn_blend": knn_choice, "noise_sigma": float(sigma_choice)},
    }
    if any(task.similarity for task in tasks):  # RQ2: the paper finds interpolation works only for similar pairs
        result["by_similarity"] = {
            level: summarise([row for row in per_task if row.get("similarity") == level])
            for level in sorted({task.similarity for task in tasks})
        }
    return result, {task.location: g for task, g in zip(tasks, generated, strict=True)}


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


# -----------------------------------------------------------------------------
# out-of-distribution signal and timing


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


def timing(generator, frame: Image.Image, results: dict, config: EvalConfig) -> dict:
    """Seconds of one fine-tuning run (zoo records, seen locations) vs one generated adapter (batch 1)."""
    runs = [run["seconds"] for location_runs in results.values() for run in location_runs if run["role"] == "seen"]
    generator.generate([frame], seeds=0, steps=config.steps)  # warm-up
    seconds = []
    for seed in range(config.timing_repeats):
        start = time.perf_counter()
        generator.generate([frame], seeds=seed, steps=config.steps)
        seconds.append(time.perf_counter() - start)
    finetune, generate = statistics.fmean(runs), statistics.median(seconds)
    return {
        "finetune_seconds_per_task": finetune,
        "generate_seconds_per_adapter": generate,
        "speedup": finetune / generate,
    }


# -----------------------------------------------------------------------------
# the stage


def evaluate_store(
    dataset: CCTDataset,
    store: Store,
    generator,
    config: EvalConfig,
    roles: Sequence[str] = ("rq1", "rq2", "rq3"),
    progress: bool = False,
) -> tuple[dict, Setup, dict[str, torch.Tensor], dict[str, list[Task]]]:
    """Evaluate a store's generator against its own zoo -> (report sections, setup, generated by location,
    the tasks by role, for the sections that reuse their frames)."""
    setup = build_setup(generator, *load_zoo(store, generator.shapes), config)
    backbone = generator.backbone_config
    report, generated, tasks = {}, {}, {}
    for rq in roles:
        tasks[ROLES[rq]] = load_tasks(dataset, ROLES[rq], setup.results, backbone)
        report[rq], vectors = evaluate_role(setup, tasks[ROLES[rq]], config, progress)
        generated.update(vectors)
    return report, setup, generated, tasks


def evaluate(
    dataset: CCTDataset,
    store: Store,
    profile: Profile,
    ablation: bool = False,
    scaling: bool = False,
    progress: bool = True,
) -> dict:
    """Write STORE/report/{report.json, report.md, *.png}; returns the report.

    `ablation` / `scaling` also run those studies (`training.studies`, each fits extra generators); without
    them, the results of an earlier run that did are kept."""
    # One thread: evaluation is many small forward passes, and on a shared 2-core machine a second
    # thread costs more in synchronisation than it gains (measured 36 ms vs 1.3 s per adapter).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _evaluate(dataset, store, profile, ablation, scaling, progress)
    finally:
        torch.set_num_threads(threads)


def _evaluate(dataset: CCTDataset, store: Store, profile: Profile, ablation: bool, scaling: bool, progress: bool):
    from model_store.generator import Generator
    from training import report as report_files
    from training import studies

    start = time.perf_counter()
    config = profile.evaluate
    generator = Generator.from_store(store)
    sections, setup, generated, tasks = evaluate_store(dataset, store, generator, config, progress=progress)
    sections["rq3"]["summary"]["ood_auroc"] = ood_auroc(dataset, generator)
    first_seen = fresh_frame(dataset, dataset.locations("seen")[0])[1]
    held_out = {role: tasks[role] for role in FEWSHOT_ROLES}
    fewshot, fewshot_seconds = evaluate_fewshot(
        dataset, generator, load_fallback(store), sections, held_out, config.steps, config.fewshot
    )
    report = {
        **sections,
        "fewshot": fewshot,
        "representation": evaluate_representation(dataset, generator, tasks, config.steps, config.representation),
        "timing": timing(generator, first_seen, setup.results, config),
        "settings": settings(store, generator, setup, config),
    }
    report["timing"]["fewshot_seconds_per_adaptation"] = fewshot_seconds
    report["settings"]["evaluate_seconds"] = time.perf_counter() - start
    if ablation:
        store.save_json(f"{REPORT}/ablation.json", studies.saving_interval_ablation(dataset, store, profile, progress))
    if scaling:
        rows = studies.seen_scaling(dataset, store, profile, progress)
        store.save_json(f"{REPORT}/scaling.json", {"scaling": rows, "setup": studies.scaling_setup(profile)})
    report["ablation"] = previous(store, "ablation.json", {"saving_interval": [], "setup": ""})
    scaling_result = previous(store, "scaling.json", {"scaling": [], "setup": ""})
    report["scaling"] = scaling_result["scaling"]
    report["settings"]["scaling"] = scaling_result["setup"]
    store.save_json(f"{REPORT}/report.json", report)
    report_files.write(store, report, setup.zoo, generated, dataset)
    return report


def previous(store: Store, name: str, default):
    """The ablation or scaling result of the latest `--ablation` / `--scaling` run, if any."""
    return store.load_json(f"{REPORT}/{name}") if store.has(f"{REPORT}/{name}") else default


def settings(store: Store, generator, setup: Setup, config: EvalConfig) -> dict:
    """What this evaluation used, so the report can be read without the code."""
    return {
        "store_id": getattr(generator, "store_id", None),
        "profile": store.manifest.get("profile"),
        "samples": config.samples,
        "steps": config.steps,
        "baseline_samples": config.baseline_samples,
        "seen_locations": len(setup.zoo.locations),
        "zoo_checkpoints": len(setup.zoo.vectors),
        "adapter_parameters": int(setup.zoo.vectors.shape[1]),
        "typical_nn_distance": setup.typical_nn,
        "location_spacing_ratio": baselines.location_spacing(setup.zoo) / setup.typical_nn,
        "condition": "first held-out (odd-position) background frame of each location",
        "finetuned_best": "checkpoint with the best val accuracy, reported on test",
        "generated_selected": "sample with the best val accuracy, reported on test",
        "knn_blend_and_noise": "k, weighting and sigma chosen per role by mean val accuracy",
        "max_iou": f"over the {config.iou_neighbours} nearest training checkpoints (weight space) per sample",
    }
