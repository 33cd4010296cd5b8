"""`wildpdiff generate`: background frames (and shots or unlabelled frames) from files -> a PEFT adapter folder.

    wildpdiff generate --store model_store/demo --background day.png night.png --out adapter/ [--seed 0]

The command reads and decodes the files as the service decodes uploads (`to_rgb`) and calls the same
`model_store.inference.infer`, so the CLI and the service answer alike. `read_frame`, `generation_options`,
`serving_context` and `ood_warning` are shared with `wildpdiff classify --background` (training/classify.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from model_store.backbone import preprocess
from model_store.generator import DEFAULT_FRAME_RULE, DEFAULT_STEPS, FRAME_RULES, Generator
from model_store.inference import (
    DEFAULT_OOD_THRESHOLD,
    DEFAULT_POLICY,
    METHODS,
    POLICIES,
    Inference,
    InferenceOptions,
    ServingTable,
    infer,
    load_serving_table,
    stored_ood_threshold,
    to_rgb,
)
from model_store.lora import save_adapter_dir
from model_store.store import Store
from training.data import read_image


def read_frame(path: str | Path) -> Image.Image:
    """One image file -> RGB, as the service decodes an upload; ValueError when it is not a readable image."""
    image = read_image(Path(path))
    if image is None:
        raise ValueError(f"{path}: not a readable image (missing, truncated or not an image file)")
    try:
        return to_rgb(image)
    except Exception as e:  # as the service: an odd file can trip any conversion, and it is still the file's fault
        raise ValueError(f"{path}: cannot convert its {image.mode} pixels to RGB ({e})") from None


def serving_context(store: Store) -> tuple[ServingTable, float]:
    """The store's serving table and OOD threshold (`DEFAULT_OOD_THRESHOLD` when none is calibrated): what the
    service hands `infer`."""
    threshold = stored_ood_threshold(store)
    return load_serving_table(store), DEFAULT_OOD_THRESHOLD if threshold is None else threshold


def ood_warning(result: Inference, threshold: float, advice: str) -> str:
    """The stderr line for an answer to an out-of-distribution background; `advice`: what the user can do."""
    return (
        f"warning: the background is out of distribution (distance {result.distance:.2f} > threshold "
        f"{threshold:.2f}); served {result.method} (policy {result.policy_applied}): no zero-shot adapter is "
        f"reliable this far from the seen locations; {advice}"
    )


def generate(args: argparse.Namespace) -> None:
    """Frames and options from the command line -> a PEFT adapter folder, through the one inference path."""
    images = [read_frame(path) for path in args.background]
    shots = [read_frame(path) for path in args.shots]
    frames = [read_frame(path) for path in frame_files(args.frames)]
    store = Store(args.store)
    generator = Generator.from_store(store)
    table, threshold = serving_context(store)
    options = InferenceOptions(
        seed=args.seed,
        steps=args.steps,
        frame_rule=args.frame_rule,
        policy=args.policy,
        method=args.method,
        shots=preprocess(shots, generator.backbone_config) if shots else None,
        labels=tuple(args.labels),
        refine_steps=args.refine_steps,
        candidates=args.candidates,
        frames=preprocess(frames, generator.backbone_config) if frames else None,
    )
    result = infer(generator, images, options, table=table, ood_threshold=threshold)
    save_adapter_dir(args.out, result.state, generator.layout, f"wildpdiff:{generator.store_id}", result.metadata)
    chosen = ""
    if result.fewshot is not None:
        chosen = f"; chose {result.fewshot.source} ({result.fewshot.shot_acc:.0%} on {len(shots)} shots)"
    elif result.zerolabel is not None:
        z = result.zerolabel
        chosen = f"; {len(frames)} unlabelled frames: started from {z.source}, {z.steps} adaptation steps ({z.stopped})"
    print(
        f"adapter written to {args.out} by {result.method} ({result.region} region, policy {result.policy_applied}; "
        f"{len(images)} background frame(s), {args.frame_rule} rule; seed {args.seed}, {args.steps} steps, "
        f"condition distance {result.distance:.2f}, nearest seen location {result.nearest_location}{chosen})"
    )
    if not result.in_distribution and result.fewshot is None:
        advice = (
            "adapt with a few labelled frames (--shots ... --labels ... --refine-steps 10) "
            "or many unlabelled ones (--frames DIR)"
        )
        print(ood_warning(result, threshold, advice), file=sys.stderr)


FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")


def frame_files(paths: list[str]) -> list[str]:
    """Files as given; a folder -> its image files (by suffix), sorted. A folder without any is an error."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES)
            if not found:
                raise ValueError(f"{path}: no image files ({', '.join(FRAME_SUFFIXES)}) in this folder")
            files += found
        else:
            files.append(str(path))
    return files


def generation_options(p: argparse.ArgumentParser) -> None:
    """The options of an adapter generated from background frames, shared by `generate` and `classify`."""
    p.add_argument(
        "--frame-rule",
        choices=FRAME_RULES,
        default=DEFAULT_FRAME_RULE,
        help=f"how several frames become one condition (default {DEFAULT_FRAME_RULE}: of their features)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"DDIM steps (default {DEFAULT_STEPS})")
    p.add_argument(
        "--method",
        choices=METHODS,
        help="generate (DDIM from noise), anchored (DDIM from the knn_blend adapter), knn_blend or nearest (the "
        "seen locations' mean adapters); default: the store's serving table for the frame's distance region",
    )
    p.add_argument(
        "--policy",
        choices=POLICIES,
        default=DEFAULT_POLICY,
        help="out of distribution: generate anyway, fall back to the nearest seen location's mean adapter, or "
        f"refuse (exit status 2); default {DEFAULT_POLICY}, as the service",
    )
