"""Background frames of real locations: per-pixel medians of empty frames.

    wildpdiff backgrounds --data DATA --out DIR [--force]

A camera trap sees the same scene in every frame; the per-pixel median of a few empty frames keeps the
scene and drops what changes between them (a mislabelled animal, moving grass, shadows, noise). That
is the classic camera-trap background and what the generator is conditioned on.

Per location: its empty frames of the train and val splits (test frames are never used) are sorted by
time and split by time of day (`datetime` hour 06-17: day, else night; no readable time: "any").
Each bucket is cut into up to `per_bucket` consecutive time windows, and `frames` evenly spaced frames
of a window give one median, written as `<bucket>_<k>.png` (long side at most `max_side`; frames of
other sizes are resized to the first one's). A location with two or more empty frames gets at least
two backgrounds, since the generator trains on half of a location's backgrounds and holds out the rest.

Where they go: this command writes DIR/<location>/. The training stages use the dataset's own
`backgrounds/` when it exists, else `--backgrounds DIR`, else they derive the missing locations into
STORE/backgrounds/ (listed in the store's manifest). The dataset folder is never written to.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from model_store.store import atomic_write_bytes
from training.data import CCTDataset, Frame, read_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class BackgroundConfig:
    frames: int = 5  # empty frames combined into one median
    per_bucket: int = 6  # backgrounds per location and time-of-day bucket, at most
    max_side: int = 448  # long side of a written background in pixels; the backbone resizes it again
    day_hours: tuple[int, int] = (6, 18)  # [start, end) hours counted as day


def time_bucket(datetime: str, config: BackgroundConfig) -> str:
    """Time-of-day bucket ("day", "night", "any") from the hour of a CCT `datetime` such as "2011-07-17 11:29:30"."""
    match = re.search(r"[ T](\d{1,2}):\d{2}", datetime)
    if not match:
        return "any"
    start, end = config.day_hours
    return "day" if start <= int(match.group(1)) < end else "night"


def plan_medians(frames: list[Frame], config: BackgroundConfig) -> dict[str, list[list[Frame]]]:
    """Empty train/val frames of one location -> {bucket: [frames of each median]}."""
    empty = sorted((f for f in frames if f.label == 0 and f.split != "test"), key=lambda f: (f.datetime, str(f.file)))
    buckets: dict[str, list[Frame]] = {}
    for frame in empty:
        buckets.setdefault(time_bucket(frame.datetime, config), []).append(frame)
    plan = {}
    for bucket, members in sorted(buckets.items()):
        windows = min(config.per_bucket, max(len(members) // config.frames, min(2, len(members))))
        plan[bucket] = [
            [window[int(i)] for i in np.unique(np.linspace(0, len(window) - 1, config.frames).round())]
            for window in np.array_split(np.array(members, dtype=object), windows)
        ]
    return plan


def median_image(paths: list[Path], max_side: int) -> Image.Image | None:
    """Per-pixel median of the readable images among `paths` (None if none is readable)."""
    stack, size = [], None
    for path in paths:
        image = read_image(path, max_side)
        if image is None:
            continue
        image = image.convert("RGB")
        if size is None:
            scale = min(1.0, max_side / max(image.size))
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        stack.append(np.asarray(image.resize(size, Image.Resampling.BILINEAR) if image.size != size else image))
    if not stack:
        return None
    return Image.fromarray(np.median(np.stack(stack), axis=0).round().astype(np.uint8))


def location_backgrounds(dataset: CCTDataset, location: str, config: BackgroundConfig) -> dict[str, Image.Image]:
    """File name -> median background, for one location (empty if it has no readable empty frame)."""
    out = {}
    for bucket, groups in plan_medians(dataset.frames.get(location, []), config).items():
        for k, group in enumerate(groups):
            image = median_image([f.file for f in group], config.max_side)
            if image is not None:
                out[f"{bucket}_{k:02d}.png"] = image
    return out


def write_backgrounds(
    dataset: CCTDataset,
    out: Path,
    locations: list[str],
    config: BackgroundConfig | None = None,
    force: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Write out/<location>/*.png for every location that has none yet (all of them with `force`).

    Returns the files written; each one atomically, so an interrupted run resumes cleanly.
    """
    config = config or BackgroundConfig()
    written = []
    for location in tqdm(locations, desc="backgrounds", unit="location", disable=not progress):
        folder = Path(out) / location
        if not force and folder.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
            continue
        for name, image in location_backgrounds(dataset, location, config).items():
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            atomic_write_bytes(folder / name, buffer.getvalue())
            written.append(folder / name)
    return written
