"""The two evaluation studies that fit extra generators: `wildpdiff evaluate --ablation` / `--scaling`.

Each study point is a complete sub-store inside the main store, so `training.fit` and `Generator` work on
it unchanged (fit reads `zoo/` and the dataset's seen locations):

    STORE/ablation/interval_<k>/        backbone (hard link), its own zoo saved every k steps, generator
    STORE/scaling/n<n>_seed<s>/         backbone, a random subset of n seen locations of the main zoo
                                        (hard links), generator fitted with seed s

A sub-store records the key of what built it (parent backbone hash + study config); a sub-store with
another key is deleted and rebuilt, one with the same key is reused (zoo and fit resume inside it).
Fits are cheaper than the main one (fewer steps; ablation on fewer locations); the report says which.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, replace

from model_store.backbone import BACKBONE_FILE
from model_store.lora import LoraLayout
from model_store.store import MANIFEST, Store
from training.data import CCTDataset
from training.evaluate import EvalConfig, evaluate_store
from training.profiles import Profile
from training.zoo import collect_zoo, load_zoo_results


def subset(dataset: CCTDataset, seen: list[str], others: bool) -> CCTDataset:
    """The dataset with only `seen` as seen locations (and no interp/unseen unless `others`)."""
    tasks = dict(dataset.tasks, seen=list(seen))
    if not others:
        tasks.update(interp=[], unseen=[])
    return replace(dataset, tasks=tasks)


def study_store(store: Store, relpath: str, config: dict) -> Store:
    """A sub-store sharing the parent's backbone; rebuilt from scratch when what it was built from changed."""
    key = hashlib.sha256(
        json.dumps({"backbone": store.manifest["files"][BACKBONE_FILE]["sha256"], **config}, sort_keys=True).encode()
    ).hexdigest()[:16]
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
    dataset: CCTDataset, sub: Store, profile: Profile, config: EvalConfig, study, seed: int, roles, progress: bool
) -> dict:
    from model_store.generator import Generator
    from training.fit import fit

    fit_config = replace(profile.fit, vae_steps=study.vae_steps, denoiser_steps=study.denoiser_steps, seed=seed)
    fit(dataset, sub, fit_config, progress=progress)
    generator = Generator.from_store(sub)
    # The studies compare generation with fine-tuning and retrieval only: no hypernet to train per point.
    config = replace(config, samples=study.samples, hypernet=replace(config.hypernet, steps=0))
    sections, *_ = evaluate_store(dataset, sub, generator, config, roles, progress)
    return sections


def saving_interval_ablation(dataset: CCTDataset, store: Store, profile: Profile, progress: bool = True) -> dict:
    """RQ1 fine-tuned vs generated accuracy when the zoo saves a checkpoint every 1, 10, 100 steps."""
    config = profile.evaluate
    study = config.ablation
    seen = dataset.locations("seen")[: study.locations]
    data = subset(dataset, seen, others=False)
    layout = LoraLayout.from_dict(store.manifest["components"]["lora"])
    rows = []
    for interval in study.intervals:
        zoo_config = replace(profile.zoo, interval=interval, runs=study.runs, folder="zoo")
        built_from = {"study": asdict(study), "zoo": asdict(zoo_config), "fit": asdict(profile.fit), "seen": seen}
        sub = study_store(store, f"ablation/interval_{interval}", built_from)
        collect_zoo(data, sub, zoo_config, layout, progress=progress)
        rq1 = fit_and_evaluate(data, sub, profile, config, study, profile.fit.seed, ("rq1",), progress)["rq1"]
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
        f"location, {profile.zoo.warmup_steps} warm-up steps, {profile.zoo.checkpoints} checkpoints per run) and its "
        f"own generator (VAE {study.vae_steps} + denoiser {study.denoiser_steps} steps), evaluated on those "
        f"locations' test splits with {study.samples} samples from one fresh frame each."
    )
    return {"saving_interval": rows, "setup": setup}


def seen_scaling(dataset: CCTDataset, store: Store, profile: Profile, progress: bool = True) -> list[dict]:
    """RQ2/RQ3 accuracy of generation and of its baselines with n randomly chosen seen locations."""
    config = profile.evaluate
    study = config.scaling
    seen = dataset.locations("seen")
    results = load_zoo_results(store)
    rows = []
    for n in [size for size in study.sizes if size <= len(seen)]:
        for seed in study.seeds:
            chosen = sorted(random.Random(seed).sample(seen, n))
            built_from = {"study": asdict(study), "fit": asdict(profile.fit), "seen": chosen, "seed": seed}
            sub = study_store(store, f"scaling/n{n}_seed{seed}", built_from)
            files = [c["file"] for loc in chosen for run in results[loc] for c in run["checkpoints"]]
            done = [f"zoo/{loc}/run{run['run']}/result.json" for loc in chosen for run in results[loc]]
            if not all(sub.has(relpath) for relpath in done):
                link(store, sub, *files, *done)
            sections = fit_and_evaluate(
                subset(dataset, chosen, others=True), sub, profile, config, study, seed, ("rq2", "rq3"), progress
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


def scaling_setup(profile: Profile) -> str:
    study = profile.evaluate.scaling
    return (
        f"Random subsets of {', '.join(map(str, study.sizes))} seen locations of the main zoo, seeds "
        f"{', '.join(map(str, study.seeds))} (subset and fit); generator fitted with VAE {study.vae_steps} + denoiser "
        f"{study.denoiser_steps} steps; {study.samples} samples per location from one fresh frame."
    )
