"""`wildpdiff generate`: background frames (and shots or unlabelled frames) from files -> a PEFT adapter folder.

The command reads and decodes the files as the service decodes uploads (`to_rgb`) and calls the same
`model_store.inference.infer`, so the CLI and the service answer alike.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model_store.backbone import preprocess
from model_store.generator import Generator
from model_store.inference import (
    DEFAULT_OOD_THRESHOLD,
    InferenceOptions,
    infer,
    load_serving_table,
    stored_ood_threshold,
    to_rgb,
)
from model_store.lora import save_adapter_dir
from model_store.store import Store
from training.data import read_image


def generate(args: argparse.Namespace) -> None:
    """Frames and options from the command line -> a PEFT adapter folder, through the one inference path."""

    def read(path: str):
        image = read_image(Path(path))
        if image is None:
            raise ValueError(f"{path}: not a readable image")
        return to_rgb(image)  # as the service decodes an upload

    images = [read(path) for path in args.background]
    shots = [read(path) for path in args.shots]
    frames = [read(path) for path in frame_files(args.frames)]
    store = Store(args.store)
    generator = Generator.from_store(store)
    threshold = stored_ood_threshold(store)
    threshold = DEFAULT_OOD_THRESHOLD if threshold is None else threshold
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
    result = infer(generator, images, options, table=load_serving_table(store), ood_threshold=threshold)
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
        print(
            f"warning: the background is out of distribution (distance {result.distance:.2f} > threshold "
            f"{threshold:.2f}); served {result.method} (policy {result.policy_applied}): no zero-shot adapter is "
            "reliable this far from the seen locations; adapt with a few labelled frames "
            "(--shots ... --labels ... --refine-steps 10) or many unlabelled ones (--frames DIR)",
            file=sys.stderr,
        )


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
