"""Quality and speed of a fitted generator on the seen locations -> STORE/fit/metrics.json.

    python bench/generator.py --data data/demo --store model_store/demo [--samples 10] [--compare OTHER_STORE]

- condition: how well ONE fresh (held-out) background frame identifies its location (1-NN over the stored
  training-half frames), for the pooled tokens after every block and for the final embedding, day and
  night-infrared frames apart;
- vae: test accuracy of every seen checkpoint after encode -> decode, against the checkpoint itself;
- generated: per seen location, `samples` adapters (seeds 0..samples-1, `--steps` DDIM steps) from the
  location's first fresh frame (the frame evaluation uses); mean test accuracy over the samples (not the best),
  against the mean of the location's fine-tuned checkpoints and the pretrained backbone;
- timing: seconds per adapter at batch 1 and 64 (frame -> adapter tensors), one torch thread;
- fit: seconds per component, from the manifest.
`--compare` stores (the same zoo, another generator config) get the `generated` measurement too.
The defaults in `training.fit.FitConfig` (MLP decoder, sample prediction, UNet over MLP) were first picked on
these numbers (seen locations' test splits), then re-checked on the val splits: sample vs epsilon prediction
0.935 vs 0.933 generated, MLP vs conv decoder 0.944 vs 0.926 reconstructed (demo, 2026-11-26).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm

from model_store.backbone import normalize
from model_store.condition import (
    ConditionConfig,
    ConditionEncoder,
    is_night,
    location_identification,
)
from model_store.generator import DEFAULT_STEPS, Generator
from model_store.lora import adapter_accuracy, unflatten
from model_store.store import Store
from training.data import CCTDataset, DatasetSpec, read_dataset
from training.evaluation.targets import fresh_frame
from training.fit import embed_backgrounds
from training.zoo import load_seen_zoo, load_zoo_results


def condition_table(dataset: CCTDataset, generator: Generator) -> list[dict]:
    locations = generator.locations
    variants = [ConditionConfig(features="block", block=k) for k in range(len(generator.classifier.blocks))]
    rows = []
    for config in [*variants, ConditionConfig(features="final")]:
        encoder = ConditionEncoder(generator.classifier.tower, generator.backbone_config, config)
        train, train_location, _ = embed_backgrounds(dataset, encoder, locations, "train")
        fresh, fresh_location, night = embed_backgrounds(dataset, encoder, locations, "fresh")
        correct = location_identification(train, train_location, fresh, fresh_location).float()
        rows.append(
            {
                "features": config.features if config.features == "final" else f"block{config.block}",
                "all": correct.mean().item(),
                "day": correct[~night].mean().item(),
                "night": correct[night].mean().item() if night.any() else None,
                "frames_day": int((~night).sum()),
                "frames_night": int(night.sum()),
            }
        )
    return rows


def score(generator: Generator, vectors: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor]) -> list[float]:
    """(N, P) flat adapters -> test accuracy of each."""
    return [
        adapter_accuracy(
            generator.classifier,
            unflatten(v, generator.shapes),
            generator.layout,
            normalize(test[0], generator.backbone_config),
            test[1],
        )
        for v in vectors
    ]


def vae_reconstruction(dataset: CCTDataset, store: Store, generator: Generator) -> dict:
    zoo, _ = load_seen_zoo(store, generator.shapes, list(generator.locations))
    with torch.no_grad():
        z = generator.vae.encode(generator.normalization.normalize(zoo.vectors))
        reconstructed = generator.normalization.denormalize(generator.vae.decode(z))
    original, rebuilt = [], []
    for index, location in enumerate(tqdm(zoo.locations, desc="vae", leave=False)):
        test = dataset.load(location, "test", generator.backbone_config.image_size)
        rows = zoo.location == index
        original += score(generator, zoo.vectors[rows], test)
        rebuilt += score(generator, reconstructed[rows], test)
    return {
        "checkpoints": len(original),
        "original_acc": statistics.fmean(original),
        "reconstructed_acc": statistics.fmean(rebuilt),
        "latent_std": z.std().item(),
    }


def generated_accuracy(dataset: CCTDataset, store: Store, generator: Generator, samples: int, steps: int) -> dict:
    results = load_zoo_results(store)
    rows = []
    for location in tqdm(generator.locations, desc="generated", leave=False):
        frame = fresh_frame(dataset, location)[1]
        fresh = generator.embed([frame])  # (1, D)
        vectors = generator.generate_vectors(fresh.repeat(samples, 1), seeds=list(range(samples)), steps=steps)
        test = dataset.load(location, "test", generator.backbone_config.image_size)
        accuracies = score(generator, vectors, test)
        finetuned = [c["test_acc"] for run in results[location] for c in run["checkpoints"]]
        rows.append(
            {
                "location": location,
                "pretrain_acc": results[location][0]["pretrain_test_acc"],
                "finetuned_acc": statistics.fmean(finetuned),
                "generated_acc": statistics.fmean(accuracies),
                "generated_min": min(accuracies),
                "generated_max": max(accuracies),
                "condition_distance": generator.distance(fresh).item(),
                "nearest_location": generator.nearest_location(fresh)[0],
                "night": is_night(frame),
            }
        )
    summary = {
        key: statistics.fmean(row[key] for row in rows) for key in ("pretrain_acc", "finetuned_acc", "generated_acc")
    }
    summary["gap_points"] = 100 * (summary["generated_acc"] - summary["finetuned_acc"])
    summary["nearest_is_own"] = statistics.fmean(row["nearest_location"] == row["location"] for row in rows)
    for name, night in (("day_frames", False), ("night_frames", True)):
        subset = [row for row in rows if row["night"] == night]
        summary[name] = {
            "locations": len(subset),
            "finetuned_acc": statistics.fmean(row["finetuned_acc"] for row in subset) if subset else None,
            "generated_acc": statistics.fmean(row["generated_acc"] for row in subset) if subset else None,
        }
    return {"samples": samples, "steps": steps, "summary": summary, "per_location": rows}


def timing(dataset: CCTDataset, generator: Generator, steps: int) -> dict:
    frame = fresh_frame(dataset, generator.locations[0])[1]
    generator.generate([frame], seeds=0, steps=steps)  # warm-up
    out = {}
    for batch, repeats in ((1, 10), (64, 3)):
        start = time.perf_counter()
        for r in range(repeats):
            generator.generate([frame] * batch, seeds=list(range(r * batch, (r + 1) * batch)), steps=steps)
        out[f"seconds_per_adapter_batch{batch}"] = (time.perf_counter() - start) / (repeats * batch)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--compare", nargs="*", default=[], help="other stores: generated accuracy only")
    args = parser.parse_args()
    torch.set_num_threads(1)

    store = Store.open(args.store)
    dataset = read_dataset(DatasetSpec.of_store(args.data, store))
    generator = Generator.from_store(store)
    components = store.manifest["components"]
    metrics = {
        "store_id": generator.store_id,
        "condition": {
            "chosen": components["condition"]["config"],
            "chosen_location_id": components["condition"]["location_id"],
            "table": condition_table(dataset, generator),
        },
        "vae": vae_reconstruction(dataset, store, generator),
        "generated": generated_accuracy(dataset, store, generator, args.samples, args.steps),
        "timing": {"steps": args.steps, "threads": 1, **timing(dataset, generator, args.steps)},
        "fit_seconds": {name: components[name]["seconds"] for name in ("condition", "vae", "denoiser")},
        "denoiser": components["denoiser"]["config"],
    }
    metrics["compare"] = []
    for other in args.compare:
        other_store = Store.open(other)
        other_generator = Generator.from_store(other_store)
        result = generated_accuracy(dataset, other_store, other_generator, args.samples, args.steps)
        other_components = other_store.manifest["components"]
        metrics["compare"].append(
            {
                "store": other,
                "denoiser": other_components["denoiser"]["config"],
                "vae": other_components["vae"]["config"],
                "fit_seconds": {name: other_components[name]["seconds"] for name in ("vae", "denoiser")},
                "summary": result["summary"],
            }
        )
    store.save_json("fit/metrics.json", metrics)
    print(f"written {store.path('fit/metrics.json')}")


if __name__ == "__main__":
    main()
