"""What generation anchored on retrieval gains over the blend, per denoiser target and fit seed -> JSON.

    python -m bench.anchoring --data data/demo --store model_store/demo [--seeds 3] [--targets latent residual]
        [--neighbours 0 4]

For every denoiser target (`FitConfig.denoiser_target`: "latent", the adapter's VAE latent, or "residual",
that latent minus the leave-self-out knn_blend's), every count of retrieved neighbours the denoiser sees
(`DenoiserConfig.neighbours`, 0: none) and every fit seed, the denoiser is refitted in a sub-store
(`STORE/variants/<target>[_n<k>]_seed<s>/`, everything else hard-linked from the store; the store's own denoiser
is reused for its own settings and seed) and evaluated as `wildpdiff evaluate` does (`evaluate_store`). Per role it
records the VAL means that decide (generate, knn_blend, nearest, anchored at every strength) and the TEST
summary that is reported (generated, anchored, served, knn_blend, paired differences to knn_blend). A target
is kept as the default only if it wins on val, over the new (interp + unseen) locations and the seeds.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import replace
from pathlib import Path

from model_store.generator import Generator
from model_store.store import Store
from training.data import DatasetSpec, read_dataset
from training.evaluation.stage import evaluate_store
from training.profiles import get_profile
from training.studies import refit_denoiser, val_means

ROLES = ("rq1", "rq2", "rq3")
TEST_FIELDS = ("generated_acc", "anchored_acc", "served_acc", "finetuned_acc")


def summarise(sections: dict) -> dict:
    out = {}
    for rq in ROLES:
        section = sections[rq]
        if not section["per_task"]:
            continue
        summary = section["summary"]
        test = {field: summary.get(field) for field in TEST_FIELDS}
        out[rq] = {
            "val": val_means(section),
            "test": test | {"knn_blend": summary["baselines"]["knn_blend"]},
            "paired": {name: summary["paired"][name] for name in ("served", "anchored", "generated")},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--targets", nargs="+", default=["latent", "residual"], choices=["latent", "residual"])
    parser.add_argument("--neighbours", nargs="+", type=int, default=[0], help="retrieved locations seen (0: none)")
    parser.add_argument("--out", default="bench/results/anchoring.json")
    args = parser.parse_args()

    store = Store(args.store)
    profile = get_profile(store.manifest.get("profile") or "demo")
    dataset = read_dataset(DatasetSpec.of_store(args.data, store))
    own = store.manifest["components"]["denoiser"]
    own_seed, own_neighbours = own["settings"].get("seed", profile.fit.seed), own["config"].get("neighbours", 0)
    own_variant = (own.get("target", "latent"), own_neighbours)
    results = []
    for target, k in itertools.product(args.targets, args.neighbours):
        for seed in range(profile.fit.seed, profile.fit.seed + args.seeds):
            if ((target, k), seed) == (own_variant, own_seed):
                sub = store
            else:
                denoiser = replace(profile.fit.denoiser, neighbours=k)
                config = replace(profile.fit, denoiser_target=target, denoiser=denoiser, seed=seed)
                # the store's own settings' sub-stores are those of `wildpdiff evaluate --fit-seeds` (same key: reused)
                name = f"{target}_n{k}" if k else target
                relpath = f"fit_seeds/seed{seed}" if (target, k) == own_variant else f"variants/{name}_seed{seed}"
                sub = refit_denoiser(store, relpath, config)
            sections, *_ = evaluate_store(dataset, sub, Generator.from_store(sub), profile.evaluate, progress=True)
            results.append({"target": target, "neighbours": k, "seed": seed, **summarise(sections)})
            row = results[-1]
            print(
                f"{target} neighbours {k} seed {seed}: "
                + "; ".join(
                    f"{rq} val generate {row[rq]['val']['generate']:.4f} knn {row[rq]['val']['knn_blend']:.4f}, "
                    f"test served {row[rq]['test']['served_acc']:.4f} anchored {row[rq]['test']['anchored_acc']:.4f}"
                    for rq in ROLES
                    if rq in row
                ),
                flush=True,
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"store": str(store.root), "results": results}, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
