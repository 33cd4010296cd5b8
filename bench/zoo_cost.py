"""More distinct seen locations or more runs per location, at equal zoo cost (fine-tuning runs) -> JSON.

    python -m bench.zoo_cost --data data/demo --store model_store/demo [--seeds 3] [--full] [--out FILE]

The zoo fine-tunes every seen location R times (`ZooConfig.runs`; 2 on the demo store: 40 locations x 2 runs).
Arms, each with seeds 0..seeds-1 (the seed draws the subset and fits the generator):

    locations   every seen location, run 0 only                          (40 x 1 on the demo store)
    runs        random.Random(seed).sample of 1/R of them, all R runs    (20 x 2)
    full        every seen location, all runs (--full; a reference at R times the cost)

Each point is a sub-store `STORE/zoo_cost/<arm>_seed<s>/` (`training.studies.study_store`: the chosen runs'
checkpoints and result.json hard-linked from the store's zoo), whose generator is fitted with the scaling study's
steps and samples (`profile.scaling`: VAE 1000 + denoiser 1500 steps, 5 samples on the demo profile; "full" is
refitted the same way, so it is not the store's own, longer fit) and evaluated on RQ2 (interp) and RQ3 (unseen)
by `training.studies.fit_and_evaluate` with `serve=True`, so that every location's row carries the val accuracy of
each servable method (`training.studies.val_means`). Interp locations lie between two seen locations;
in the "runs" arm some of those are not in the zoo (as in `--scaling`): each point records how many interp
locations have both, one or none of their sources among its seen locations.

Per point: test generated, knn_blend and nearest accuracy per role, the val means, zoo checkpoints and fine-tuning
seconds, fit and wall seconds. Per arm: means over the seeds. Per comparison ("locations" minus "runs"; with
--full also "full" minus each): the difference per location and seed of generated and of knn_blend test accuracy,
averaged over the seeds per location, with a 95% percentile bootstrap over locations (`paired_difference`).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from model_store.store import Store
from training.data import CCTDataset, DatasetSpec, read_dataset
from training.evaluation.roles import paired_difference
from training.profiles import Profile, get_profile
from training.studies import fit_and_evaluate, link, study_store, subset, val_means
from training.zoo import load_zoo_results

ROLES = {"rq2": "interp", "rq3": "unseen"}
METHODS = {"generated": "generated_acc", "knn_blend": "knn_blend_acc"}  # the paired methods: name -> row field
STUDY_FIELDS = ("vae_steps", "denoiser_steps", "samples")  # of `profile.scaling`


def arms(seen: list[str], runs: int, seed: int, full: bool) -> dict[str, tuple[list[str], list[int]]]:
    """arm -> (seen locations, run numbers); "locations" and "runs" use len(seen) fine-tuning runs each."""
    out = {
        "locations": (list(seen), [0]),
        "runs": (sorted(random.Random(seed).sample(seen, len(seen) // runs)), list(range(runs))),
    }
    if full:
        out["full"] = (list(seen), list(range(runs)))
    return out


def source_coverage(dataset: CCTDataset, chosen: list[str]) -> dict[str, int]:
    """How many interp locations have both, one or none of their two source locations among `chosen`."""
    counts = dict.fromkeys(("both", "one", "none"), 0)
    for location in dataset.locations("interp"):
        present = len(set(dataset.tasks["interp_sources"][location][:2]) & set(chosen))
        counts[("none", "one", "both")[present]] += 1
    return counts


def point(
    dataset: CCTDataset, store: Store, profile: Profile, study: dict, arm: str, seed: int, chosen: list[str], used: list
) -> dict:
    """Fit and evaluate one arm and seed; `used`: the result.json of each zoo run it learns from."""
    start = time.perf_counter()
    runs = sorted({run["run"] for run in used})
    built_from = {"arm": arm, "seen": chosen, "runs": runs, "fit": asdict(profile.fit), "study": study, "seed": seed}
    sub = study_store(store, f"zoo_cost/{arm}_seed{seed}", built_from)
    done = [f"zoo/{run['location']}/run{run['run']}/result.json" for run in used]
    if not all(sub.has(relpath) for relpath in done):
        link(store, sub, *[c["file"] for run in used for c in run["checkpoints"]], *done)
    sections = fit_and_evaluate(
        subset(dataset, chosen, others=True), sub, profile.fit, profile.evaluate, profile.scaling, seed,
        tuple(ROLES), progress=True, serve=True,
    )  # fmt: skip
    row = {
        "arm": arm,
        "seed": seed,
        "seen": chosen,
        "runs": runs,
        "zoo_runs": len(used),
        "zoo_checkpoints": sum(len(run["checkpoints"]) for run in used),
        "zoo_seconds": sum(run["seconds"] for run in used),
        "interp_sources": source_coverage(dataset, chosen),
        # what fitting this sub-store took, also when an earlier run fitted it and this one reused it
        "fit_seconds": sum(sub.manifest["components"][name]["seconds"] for name in ("condition", "vae", "denoiser")),
    }
    for rq in ROLES:
        summary, rows = sections[rq]["summary"], sections[rq]["per_task"]
        row[rq] = {
            "generated_acc": summary["generated_acc"],
            "knn_blend_acc": summary["baselines"]["knn_blend"],
            "nearest_acc": summary["baselines"]["nearest"],
            "val": val_means(sections[rq]),
            "per_location": {
                r["task"]: {"generated_acc": r["generated_acc"], "knn_blend_acc": r["baselines"]["knn_blend"]}
                for r in rows
            },
        }
    row["seconds"] = time.perf_counter() - start
    return row


def arm_means(rows: list[dict]) -> dict:
    out = {field: statistics.fmean(r[field] for r in rows) for field in ("zoo_checkpoints", "fit_seconds", "seconds")}
    for rq in ROLES:
        out[rq] = {
            field: statistics.fmean(r[rq][field] for r in rows)
            for field in ("generated_acc", "knn_blend_acc", "nearest_acc")
        }
        out[rq]["val"] = {name: statistics.fmean(r[rq]["val"][name] for r in rows) for name in rows[0][rq]["val"]}
    return out


def compare(rows: list[dict], first: str, second: str, resamples: int, seed: int) -> dict:
    """`first` minus `second` per role and method: per location, the mean over seeds of the paired difference."""
    by = {(r["arm"], r["seed"]): r for r in rows}
    seeds = sorted(s for arm, s in by if arm == first and (second, s) in by)
    out = {}
    for rq in ROLES:
        locations = by[first, seeds[0]][rq]["per_location"]
        out[rq] = {}
        for method, field in METHODS.items():
            diffs = [
                statistics.fmean(
                    by[first, s][rq]["per_location"][loc][field] - by[second, s][rq]["per_location"][loc][field]
                    for s in seeds
                )
                for loc in locations
            ]
            out[rq][method] = paired_difference(diffs, resamples, seed) | {"seeds": len(seeds)}
    return out


def table(means: dict, comparisons: dict) -> str:
    lines = [
        "| arm | checkpoints | interp gen | interp knn | interp nearest | unseen gen | unseen knn | unseen nearest "
        "| val interp gen / knn | val unseen gen / knn |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, m in means.items():
        cells = [f"{m[rq][f] * 100:.1f}" for rq in ROLES for f in ("generated_acc", "knn_blend_acc", "nearest_acc")]
        val = [f"{m[rq]['val']['generate'] * 100:.1f} / {m[rq]['val']['knn_blend'] * 100:.1f}" for rq in ROLES]
        lines.append(f"| {arm} | {m['zoo_checkpoints']:.0f} | " + " | ".join(cells + val) + " |")
    lines += ["", "| comparison | role | method | diff (points) | 95% CI | locations |", "|---|---|---|---|---|---|"]
    for name, by_rq in comparisons.items():
        for rq, by_method in by_rq.items():
            for method, d in by_method.items():
                low, high = d["ci95"]
                lines.append(
                    f"| {name} | {ROLES[rq]} | {method} | {d['diff'] * 100:+.2f} "
                    f"| [{low * 100:+.2f}, {high * 100:+.2f}] | {d['locations']} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="also refit the full zoo (every location, every run)")
    parser.add_argument("--out", default="bench/results/zoo_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    store = Store(args.store)
    profile = get_profile(store.manifest.get("profile") or "demo")
    dataset = read_dataset(DatasetSpec.of_store(args.data, store))
    study = {field: getattr(profile.scaling, field) for field in STUDY_FIELDS}
    results = load_zoo_results(store)
    runs = store.manifest["components"]["zoo"]["runs"]
    rows = []
    for seed in range(args.seeds):
        for arm, (chosen, numbers) in arms(dataset.locations("seen"), runs, seed, args.full).items():
            used = [run for loc in chosen for run in results[loc] if run["run"] in numbers]
            rows.append(point(dataset, store, profile, study, arm, seed, chosen, used))
            r = rows[-1]
            print(
                f"{arm} seed {seed}: {len(chosen)} locations x {len(numbers)} run(s), "
                f"{r['zoo_checkpoints']} checkpoints, interp sources {r['interp_sources']}; "
                + "; ".join(
                    f"{ROLES[rq]} generated {r[rq]['generated_acc']:.4f} knn_blend {r[rq]['knn_blend_acc']:.4f} "
                    f"nearest {r[rq]['nearest_acc']:.4f} (val generate {r[rq]['val']['generate']:.4f} "
                    f"knn_blend {r[rq]['val']['knn_blend']:.4f})"
                    for rq in ROLES
                )
                + f"; {r['seconds']:.0f} s",
                flush=True,
            )
    means = {arm: arm_means([r for r in rows if r["arm"] == arm]) for arm in dict.fromkeys(r["arm"] for r in rows)}
    pairs = [("locations", "runs")] + ([("full", "locations"), ("full", "runs")] if args.full else [])
    bootstrap, seed = profile.evaluate.bootstrap, profile.evaluate.seed
    comparisons = {f"{a} - {b}": compare(rows, a, b, bootstrap, seed) for a, b in pairs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {"store": str(store.root), "study": study, "points": rows, "means": means, "comparisons": comparisons},
            indent=2,
        )
    )
    print(table(means, comparisons))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
