"""The evaluation studies that fit extra generators: `wildpdiff evaluate --ablation` / `--scaling` / `--fit-seeds`.

Each study point is a complete sub-store inside the main store, so `training.fit` and `Generator` work on
it unchanged (fit reads `zoo/` and the dataset's seen locations):

    STORE/ablation/interval_<k>/        backbone (hard link), its own zoo saved every k steps, generator
    STORE/scaling/n<n>_seed<s>/         backbone, a random subset of n seen locations of the main zoo
                                        (hard links), generator fitted with seed s
    STORE/fit_seeds/seed<s>/            everything of the store but the denoiser (hard links), denoiser
                                        refitted with seed s

A sub-store records the key of what built it (parent backbone hash + study config); a sub-store with
another key is deleted and rebuilt, one with the same key is reused (zoo and fit resume inside it).
Ablation and scaling fits are cheaper than the main one (fewer steps; ablation on fewer locations), and skip
the hypernet and the serving table; the report says which. Fit seeds repeat the full evaluation.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
from dataclasses import asdict, dataclass, replace

from model_store.backbone import BACKBONE_FILE, load_backbone
from model_store.condition import CONDITION_TOWER_FILE, CONDITIONS_FILE
from model_store.denoiser import DENOISER_FILE
from model_store.generator import Generator
from model_store.lora import LoraLayout, adapter_shapes
from model_store.ood import FALLBACK_FILE
from model_store.store import MANIFEST, Store
from model_store.vae import NORMALIZATION_FILE, VAE_FILE
from training.common import config_key
from training.data import CCTDataset
from training.evaluation.config import EvalConfig
from training.evaluation.stage import evaluate_store
from training.fit import FitConfig, fit, fit_denoiser
from training.zoo import ZooConfig, collect_zoo, load_seen_zoo, load_zoo_results


@dataclass(frozen=True)
class AblationConfig:
    """`--ablation`: the paper's saving interval, each with its own zoo and generator."""

    intervals: tuple[int, ...] = (1, 10, 100)
    locations: int = 8  # the first n seen locations; fewer than the main run, to keep it affordable
    runs: int = 1  # runs per location: the interval is then the only source of checkpoint diversity
    vae_steps: int = 1500
    denoiser_steps: int = 2000
    samples: int = 5


@dataclass(frozen=True)
class ScalingConfig:
    """`--scaling`: RQ2/RQ3 as the number of seen locations grows; random subsets of the main zoo."""

    sizes: tuple[int, ...] = (8, 16, 32, 40)
    seeds: tuple[int, ...] = (0, 1, 2)  # subset and fit seed
    vae_steps: int = 1000
    denoiser_steps: int = 1500
    samples: int = 5


def subset(dataset: CCTDataset, seen: list[str], others: bool) -> CCTDataset:
    """The dataset with only `seen` as seen locations (and no interp/unseen unless `others`)."""
    tasks = dict(dataset.tasks, seen=list(seen))
    if not others:
        tasks.update(interp=[], unseen=[])
    return replace(dataset, tasks=tasks)


def study_store(store: Store, relpath: str, config: dict) -> Store:
    """A sub-store sharing the parent's backbone; rebuilt from scratch when what it was built from changed."""
    key = config_key(config, {BACKBONE_FILE: store.manifest["files"][BACKBONE_FILE]["sha256"]})[:16]
    root = store.path(relpath)
    if (root / MANIFEST).exists():
        sub = Store(root)
        if sub.manifest.get("study_key") == key:
            return sub
    shutil.rmtree(root, ignore_errors=True)
    sub = Store.create(root, profile=store.manifest.get("profile", ""), classes=store.manifest["classes"])
    link(store, sub, BACKBONE_FILE)
    for name in ("backbone", "pretrain", "lora"):
        if name in store.manifest["components"]:
            sub.set_component(name, store.manifest["components"][name])
    sub.update(study_key=key, study=config)
    return sub


def link(parent: Store, sub: Store, *relpaths: str) -> None:
    """Share files of the parent (hard links; a copy across file systems), then record them in the sub-store."""
    for relpath in relpaths:
        source, target = parent.path(relpath), sub.path(relpath)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    sub.register(*relpaths)


def fit_and_evaluate(
    dataset: CCTDataset,
    sub: Store,
    fit_config: FitConfig,
    config: EvalConfig,
    study,
    seed: int,
    roles,
    progress: bool,
    serve: bool = False,
) -> dict:
    """Fit a study point's generator with the study's steps and evaluate `roles`; `serve`: also score every
    servable method on val per location (rows' `methods`, what `val_means` reads)."""
    fit_config = replace(fit_config, vae_steps=study.vae_steps, denoiser_steps=study.denoiser_steps, seed=seed)
    fit(dataset, sub, fit_config, progress=progress)
    generator = Generator.from_store(sub)
    # The studies compare generation with fine-tuning and retrieval only: no hypernet to train per point.
    config = replace(config, samples=study.samples, hypernet=replace(config.hypernet, steps=0))
    sections, *_ = evaluate_store(dataset, sub, generator, config, roles, serve=serve, progress=progress)
    return sections


def saving_interval_ablation(
    dataset: CCTDataset,
    store: Store,
    study: AblationConfig,
    zoo: ZooConfig,
    fit_config: FitConfig,
    config: EvalConfig,
    progress: bool = True,
) -> dict:
    """RQ1 fine-tuned vs generated accuracy when the zoo saves a checkpoint every 1, 10, 100 steps."""
    seen = dataset.locations("seen")[: study.locations]
    data = subset(dataset, seen, others=False)
    layout = LoraLayout.from_dict(store.manifest["components"]["lora"])
    rows = []
    for interval in study.intervals:
        zoo_config = replace(zoo, interval=interval, runs=study.runs)
        built_from = {"study": asdict(study), "zoo": asdict(zoo_config), "fit": asdict(fit_config), "seen": seen}
        sub = study_store(store, f"ablation/interval_{interval}", built_from)
        collect_zoo(data, sub, zoo_config, layout, progress=progress)
        rq1 = fit_and_evaluate(data, sub, fit_config, config, study, fit_config.seed, ("rq1",), progress)["rq1"]
        summary = rq1["summary"]
        rows.append(
            {
                "interval": interval,
                "finetuned_acc": summary["finetuned_acc"],
                "finetuned_best_acc": summary["finetuned_best_acc"],
                "generated_acc": summary["generated_acc"],
                "generated_selected_acc": summary["generated_selected_acc"],
                "nn_l2_ratio": summary["novelty"]["nn_l2_ratio"],
                "checkpoints": sum(len(r["checkpoints"]) for runs in load_zoo_results(sub).values() for r in runs),
            }
        )
    setup = (
        f"Each interval has its own zoo ({len(seen)} seen locations: {', '.join(seen)}; {study.runs} run(s) per "
        f"location, {zoo.warmup_steps} warm-up steps, {zoo.checkpoints} checkpoints per run) and its "
        f"own generator (VAE {study.vae_steps} + denoiser {study.denoiser_steps} steps), evaluated on those "
        f"locations' test splits with {study.samples} samples from one fresh frame each."
    )
    return {"saving_interval": rows, "setup": setup}


def seen_scaling(
    dataset: CCTDataset,
    store: Store,
    study: ScalingConfig,
    fit_config: FitConfig,
    config: EvalConfig,
    progress: bool = True,
) -> list[dict]:
    """RQ2/RQ3 accuracy of generation and of its baselines with n randomly chosen seen locations."""
    seen = dataset.locations("seen")
    results = load_zoo_results(store)
    rows = []
    for n in [size for size in study.sizes if size <= len(seen)]:
        for seed in study.seeds:
            chosen = sorted(random.Random(seed).sample(seen, n))
            built_from = {"study": asdict(study), "fit": asdict(fit_config), "seen": chosen, "seed": seed}
            sub = study_store(store, f"scaling/n{n}_seed{seed}", built_from)
            files = [c["file"] for loc in chosen for run in results[loc] for c in run["checkpoints"]]
            done = [f"zoo/{loc}/run{run['run']}/result.json" for loc in chosen for run in results[loc]]
            if not all(sub.has(relpath) for relpath in done):
                link(store, sub, *files, *done)
            sections = fit_and_evaluate(
                subset(dataset, chosen, others=True), sub, fit_config, config, study, seed, ("rq2", "rq3"), progress
            )
            rq2, rq3 = sections["rq2"]["summary"], sections["rq3"]["summary"]
            rows.append(
                {
                    "n_seen": n,
                    "seed": seed,
                    "rq2_generated_acc": rq2["generated_acc"],
                    "rq2_knn_blend_acc": rq2["baselines"]["knn_blend"],
                    "rq2_nearest_acc": rq2["baselines"]["nearest"],
                    "rq3_generated_acc": rq3["generated_acc"],
                    "rq3_nearest_acc": rq3["baselines"]["nearest"],
                    "rq3_knn_blend_acc": rq3["baselines"]["knn_blend"],
                }
            )
    return rows


def scaling_setup(study: ScalingConfig) -> str:
    return (
        f"Random subsets of {', '.join(map(str, study.sizes))} seen locations of the main zoo, seeds "
        f"{', '.join(map(str, study.seeds))} (subset and fit); generator fitted with VAE {study.vae_steps} + denoiser "
        f"{study.denoiser_steps} steps; {study.samples} samples per location from one fresh frame."
    )


# -----------------------------------------------------------------------------
# fit seeds: how much of a difference between methods is the denoiser's training noise

SEED_FIELDS = ("generated_acc", "anchored_acc", "served_acc", "finetuned_acc")
SEED_PAIRED = ("served", "anchored", "generated")


def fit_seeds(
    dataset: CCTDataset,
    store: Store,
    seeds: int,
    fit_config: FitConfig,
    config: EvalConfig,
    main: dict,
    progress: bool = True,
) -> dict:
    """RQ1-RQ3 with the denoiser refitted with `seeds` seeds (the first is the store's own: `main`, its report
    sections); everything else (conditions, VAE, zoo) is the store's. -> per-seed rows, mean and spread."""
    rows = [seed_row(fit_config.seed, main)]
    for seed in range(fit_config.seed + 1, fit_config.seed + seeds):
        sub = refit_denoiser(store, f"fit_seeds/seed{seed}", replace(fit_config, seed=seed), progress)
        sections, *_ = evaluate_store(dataset, sub, Generator.from_store(sub), config, progress=progress)
        rows.append(seed_row(seed, sections))
    return {"seeds": rows, "mean": seed_spread(rows, statistics.fmean), "std": seed_spread(rows, spread)}


def refit_denoiser(store: Store, relpath: str, fit_config: FitConfig, progress: bool = True) -> Store:
    """A sub-store with everything of `store` but the denoiser (hard links), and a denoiser fitted there with
    `fit_config` (reused when it was already fitted with the same config from the same files)."""
    shared = [BACKBONE_FILE, CONDITIONS_FILE, NORMALIZATION_FILE, VAE_FILE, FALLBACK_FILE]
    shared += [CONDITION_TOWER_FILE] if store.has(CONDITION_TOWER_FILE) else []
    zoo_files = [relpath for relpath in store.manifest["files"] if relpath.startswith("zoo/")]
    hashes = {name: store.manifest["files"][name]["sha256"] for name in shared + zoo_files}
    sub = study_store(store, relpath, {"fit": asdict(fit_config), "inputs": hashes})
    if not all(sub.has(name) for name in shared + zoo_files):
        link(store, sub, *shared, *zoo_files)
        for name in ("condition", "vae", "zoo"):
            if name in store.manifest["components"]:
                sub.set_component(name, store.manifest["components"][name])
    if not sub.has(DENOISER_FILE):
        shapes = adapter_shapes(load_backbone(sub)[0], LoraLayout.from_dict(store.manifest["components"]["lora"]))
        zoo, _ = load_seen_zoo(sub, shapes, list(store.manifest["components"]["condition"]["locations"]))
        fit_denoiser(sub, zoo, fit_config, progress)
    return sub


def seed_row(seed: int, sections: dict) -> dict:
    row = {"seed": seed}
    for rq in ("rq1", "rq2", "rq3"):
        summary = sections[rq]["summary"]
        if not summary:
            continue
        row[rq] = {field: summary.get(field) for field in SEED_FIELDS}
        row[rq]["knn_blend_acc"] = summary["baselines"]["knn_blend"]
        row[rq]["val"] = val_means(sections[rq])
        row[rq]["paired"] = {name: summary["paired"][name] for name in SEED_PAIRED if name in summary["paired"]}
    return row


def val_means(section: dict) -> dict[str, float]:
    """Mean VAL accuracy of every servable method over a role's locations (what choices are made on)."""
    rows = section["per_task"]
    return {name: statistics.fmean(row["methods"][name]["val"] for row in rows) for name in rows[0]["methods"]}


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def seed_spread(rows: list[dict], statistic) -> dict:
    """`statistic` over the seeds of every accuracy and every paired difference, per role."""
    out = {}
    for rq in ("rq1", "rq2", "rq3"):
        present = [row[rq] for row in rows if rq in row]
        if not present:
            continue
        fields = [f for f in (*SEED_FIELDS, "knn_blend_acc") if all(p.get(f) is not None for p in present)]
        out[rq] = {field: statistic([p[field] for p in present]) for field in fields}
        out[rq]["paired"] = {
            name: statistic([p["paired"][name]["diff"] for p in present])
            for name in SEED_PAIRED
            if all(name in p["paired"] for p in present)
        }
    return out
