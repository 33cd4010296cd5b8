"""`wildpdiff classify`: a folder of camera-trap frames (a memory card) -> one predictions file, without a server.

    wildpdiff classify --store model_store/demo --background day.png night.png --images /media/card --out p.json
    wildpdiff classify --store model_store/demo --adapter adapter.safetensors --images /media/card --out p.json

The adapter is a file (validated as the service validates an upload), or generated from background frames by
`model_store.inference.infer` exactly as `wildpdiff generate` generates it, or neither: the base model, as the
service's /classify without an adapter. Frames are read as `wildpdiff generate` reads files (`read_frame`) and
scored by `model_store.classify.class_probabilities`, the service's own path, so a frame gets the same scores
offline and over HTTP. A file that cannot be decoded is skipped and listed under "failures"; it never stops
the run. The output (README "Offline classification") follows SpeciesNet's predictions file:

    {"info": {"format": "wildpdiff-predictions", "format_version": "1.0", "store_id", "adapter", ...},
     "predictions": [{"filepath", "prediction", "prediction_score", "classifications": {"classes", "scores"}}],
     "failures": [{"filepath", "failure"}]}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from tqdm import tqdm

from model_store.backbone import preprocess
from model_store.classify import class_probabilities, top_labels
from model_store.generator import Generator
from model_store.inference import InferenceOptions, infer
from model_store.lora import adapter_bytes, load_adapter_bytes, validate_adapter
from model_store.store import Store, atomic_write_bytes, code_version
from training.generate import FRAME_SUFFIXES, generation_options, ood_warning, read_frame, serving_context

HELP = "classify a folder of frames (a memory card) offline into a predictions JSON file"
FORMAT, FORMAT_VERSION = "wildpdiff-predictions", "1.0"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="model store folder with a fitted generator")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--adapter",
        metavar="FILE",
        help="adapter safetensors file (from POST /adapters), or the folder `wildpdiff generate` writes; "
        "with neither --adapter nor --background the base model classifies, as the service does",
    )
    source.add_argument(
        "--background", nargs="+", metavar="IMG", help="empty frame(s) of the location: generate the adapter"
    )
    p.add_argument(
        "--images",
        required=True,
        metavar="DIR",
        help=f"folder of frames, searched recursively ({', '.join(FRAME_SUFFIXES)}; hidden files and folders skipped)",
    )
    p.add_argument("--out", required=True, help="predictions JSON file to write")
    p.add_argument("--top-k", type=int, default=3, help="classes listed per frame (default 3)")
    p.add_argument("--batch-size", type=int, default=64, help="frames decoded and classified together (default 64)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    generation_options(p.add_argument_group("with --background: how the adapter is generated (as `generate`)"))


def classify(args: argparse.Namespace) -> None:
    """Flags -> predictions file; every user error is a ValueError or StoreError before anything is written."""
    start = time.perf_counter()
    if args.top_k < 1 or args.batch_size < 1:
        raise ValueError(f"--top-k and --batch-size must be 1 or more, got {args.top_k} and {args.batch_size}")
    root, out = Path(args.images), Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give the path of the predictions file to write")
    files = image_files(root)
    store = Store(args.store)
    generator = Generator.from_store(store)
    state, adapter = choose_adapter(args, store, generator)
    started = time.perf_counter()
    predictions, failures = classify_files(generator, state, root, files, args.top_k, args.batch_size, args.quiet)
    rate = len(files) / (time.perf_counter() - started)
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "wildpdiff_version": code_version(),
        "store_id": generator.store_id,
        "classifier": {"base_model_hash": generator.base_model_hash, "classes": generator.classes},
        "adapter": adapter,
        "images_folder": str(root.resolve()),
        "top_k": args.top_k,
        "images": len(predictions),
        "failures": len(failures),
    }
    output = {"info": info, "predictions": predictions, "failures": failures}
    atomic_write_bytes(out, (json.dumps(output, indent=1) + "\n").encode())
    print(
        f"{len(predictions)} images classified, {len(failures)} skipped; predictions in {out} "
        f"({time.perf_counter() - start:.1f} s in all, {rate:.0f} images/s reading and classifying)"
    )


def image_files(root: Path) -> list[Path]:
    """Image files (by suffix) anywhere under `root`, sorted by relative path. Hidden files and folders are left
    out: on a card they are the OS's (macOS `._IMG_0001.JPG` resource forks, `.Trashes` of deleted frames)."""
    if not root.is_dir():
        raise ValueError(f"--images {root}: no such folder")
    files = [
        path
        for path in root.rglob("*")
        if path.suffix.lower() in FRAME_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
        and path.is_file()
    ]
    if not files:
        raise ValueError(f"--images {root}: no image files ({', '.join(FRAME_SUFFIXES)}) in this folder or below")
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def choose_adapter(
    args: argparse.Namespace, store: Store, generator: Generator
) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """The adapter to classify with (None: the base model) and its description for the output's info.

    "sha256" is that of the adapter file; for a generated one, of the adapter_model.safetensors that `wildpdiff
    generate` writes with the same frames and options (the bytes are the same)."""
    if args.adapter:
        state, metadata, data = read_adapter(Path(args.adapter), generator)
        return state, {"source": "file", "path": args.adapter, "sha256": sha256(data), "metadata": metadata}
    if not args.background:
        return None, {"source": "base"}
    images = [read_frame(path) for path in args.background]
    table, threshold = serving_context(store)
    options = InferenceOptions(
        seed=args.seed, steps=args.steps, frame_rule=args.frame_rule, policy=args.policy, method=args.method
    )
    result = infer(generator, images, options, table=table, ood_threshold=threshold)
    print(
        f"adapter generated by {result.method} ({result.region} region, policy {result.policy_applied}; "
        f"condition distance {result.distance:.2f}, nearest seen location {result.nearest_location})"
    )
    if not result.in_distribution:
        advice = "adapt one on labelled or unlabelled frames with `wildpdiff generate` and pass it as --adapter"
        print(ood_warning(result, threshold, advice), file=sys.stderr)
    return result.state, {
        "source": "generated",
        "backgrounds": list(args.background),
        "in_distribution": result.in_distribution,
        "sha256": sha256(adapter_bytes(result.state, result.metadata)),
        "metadata": result.metadata,
    }


def read_adapter(path: Path, generator: Generator) -> tuple[dict[str, torch.Tensor], dict[str, str], bytes]:
    """An adapter file (or the PEFT folder holding one) -> (state, metadata, bytes), refused (ValueError) unless
    it is what the service accepts: safetensors of float32 tensors with the store's keys and shapes, in bounds."""
    file = path / SAFETENSORS_WEIGHTS_NAME if path.is_dir() else path
    try:
        data = file.read_bytes()
    except OSError as e:
        raise ValueError(f"--adapter {file}: cannot read it ({e.strerror})") from None
    try:
        state, metadata = load_adapter_bytes(data)
        validate_adapter(state, generator.shapes)
    except ValueError as e:
        raise ValueError(f"--adapter {file}: {e}") from None
    return state, metadata, data


def classify_files(
    generator: Generator,
    state: dict[str, torch.Tensor] | None,
    root: Path,
    files: list[Path],
    top_k: int,
    batch_size: int,
    quiet: bool,
) -> tuple[list[dict], list[dict]]:
    """Files -> (predictions, failures), `batch_size` files at a time. Each frame is shrunk to the model's input
    as soon as it is decoded, so a batch of multi-megapixel frames is never held in memory at full size."""
    predictions, failures = [], []
    with tqdm(total=len(files), desc="classify", unit="image", disable=quiet) as bar:
        for first in range(0, len(files), batch_size):
            batch = files[first : first + batch_size]
            names, pixels = [], []
            for path in batch:
                name = path.relative_to(root).as_posix()
                try:
                    image = read_frame(path)
                except ValueError as e:
                    failures.append({"filepath": name, "failure": str(e).removeprefix(f"{path}: ")})
                    continue
                names.append(name)
                pixels.append(preprocess([image], generator.backbone_config))
            if names:
                probs = class_probabilities(generator, torch.cat(pixels), state)
                for name, top in zip(names, top_labels(probs, generator.classes, top_k), strict=True):
                    predictions.append(prediction(name, top))
            bar.update(len(batch))
    return predictions, failures


def prediction(name: str, top: list[tuple[str, float]]) -> dict:
    """One frame's entry, as in SpeciesNet's predictions file (best class first)."""
    classes, scores = zip(*top, strict=True)
    return {
        "filepath": name,
        "prediction": classes[0],
        "prediction_score": scores[0],
        "classifications": {"classes": list(classes), "scores": list(scores)},
    }


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
