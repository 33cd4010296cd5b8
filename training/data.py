"""Reader for COCO Camera Traps folders: the one way every stage gets frames, synthetic or real.

A dataset folder holds `annotations.json` (images with a `location` and `seq_id`, annotations,
categories with id 0 = empty), image files, `backgrounds/<location>/*.png` and `tasks.json` naming
which locations play which role (pretrain / seen / interp / unseen).

Splits: an image's own `split` field when present (the synthetic world writes one), else a hash of
its `seq_id`, so frames of one sequence never straddle train and test.
Listed files that are missing or unreadable are skipped and counted, never fatal.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from model_store.backbone import to_uint8

ROLES = ("pretrain", "seen", "interp", "unseen")
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = {"train": 0.6, "val": 0.15}  # test takes the rest


class DataError(Exception):
    """A dataset folder that cannot be used; the message says what is wrong and where."""


@dataclass(frozen=True)
class Frame:
    file: Path
    label: int  # index into CCTDataset.categories
    location: str
    split: str


@dataclass
class CCTDataset:
    root: Path
    categories: list[str]  # contiguous class index -> name; index 0 is the empty class
    frames: dict[str, list[Frame]]  # location -> frames
    tasks: dict[str, list[str]]
    missing: int = 0  # listed files not on disk, skipped
    unlabelled: int = 0  # images without an annotation, skipped
    unreadable: Counter = field(default_factory=Counter)  # location -> corrupt files met while loading

    def locations(self, role: str) -> list[str]:
        return list(self.tasks.get(role, []))

    def split(self, location: str, split: str) -> list[Frame]:
        return [f for f in self.frames.get(location, []) if f.split == split]

    def load(self, location: str, split: str | None, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames of one location (all splits if `split` is None) -> (N, 3, S, S) uint8, (N,) labels."""
        frames = self.frames.get(location, []) if split is None else self.split(location, split)
        return self._load(frames, image_size, location)

    def load_many(self, locations: list[str], split: str | None, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [self.load(loc, split, image_size) for loc in locations]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def backgrounds(self, location: str) -> list[Path]:
        """Background (empty) frames of a location, sorted by name."""
        folder = self.root / "backgrounds" / location
        return sorted(p for p in folder.glob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})

    def _load(self, frames: list[Frame], image_size: int, location: str) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, labels = [], []
        for frame in frames:
            image = read_image(frame.file)
            if image is None:
                self.unreadable[location] += 1
                continue
            pixels.append(to_uint8(image, image_size))
            labels.append(frame.label)
        if not pixels:
            return torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
        return torch.from_numpy(np.stack(pixels)), torch.tensor(labels, dtype=torch.long)

    def summary(self) -> str:
        skipped = self.missing + self.unlabelled + sum(self.unreadable.values())
        return (
            f"{sum(len(v) for v in self.frames.values())} frames in {len(self.frames)} locations, "
            f"{len(self.categories)} classes; skipped {skipped} "
            f"(missing {self.missing}, unlabelled {self.unlabelled}, unreadable {sum(self.unreadable.values())})"
        )


def read_image(path: Path) -> Image.Image | None:
    """A fully decoded image, or None if the file is missing, truncated or not an image."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


def _hash_split(key: str) -> str:
    fraction = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if fraction < SPLIT_FRACTIONS["train"]:
        return "train"
    if fraction < SPLIT_FRACTIONS["train"] + SPLIT_FRACTIONS["val"]:
        return "val"
    return "test"


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{what} is not valid JSON: {path} ({err})") from err


def read_cct(root: str | Path) -> CCTDataset:
    """Parse and validate a CCT folder. Raises DataError with a clear message on unusable input."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    coco = _read_json(root / "annotations.json", "annotations.json")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DataError(f"{root / 'annotations.json'}: missing or malformed '{key}' list")

    category_ids = sorted(int(c["id"]) for c in coco["categories"])
    if 0 not in category_ids:
        raise DataError(f"{root / 'annotations.json'}: no category with id 0 (the empty class)")
    names = {int(c["id"]): str(c["name"]) for c in coco["categories"]}
    index_of = {cid: i for i, cid in enumerate(category_ids)}

    label_of: dict[str, int] = {}
    unknown = Counter()
    for ann in coco["annotations"]:
        cid = int(ann["category_id"])
        if cid not in index_of:
            unknown[cid] += 1
            continue
        image_id = str(ann["image_id"])
        # Several annotations on one image (a sequence-level label, or several animals): an animal wins over empty.
        if label_of.get(image_id, 0) == 0:
            label_of[image_id] = index_of[cid]
    if unknown:
        listed = ", ".join(f"{cid} ({n}x)" for cid, n in sorted(unknown.items()))
        raise DataError(f"{root / 'annotations.json'}: annotations use unknown category ids: {listed}")

    frames: dict[str, list[Frame]] = defaultdict(list)
    missing = unlabelled = 0
    for image in coco["images"]:
        image_id = str(image["id"])
        if image_id not in label_of:
            unlabelled += 1
            continue
        path = root / image["file_name"]
        if not path.is_file():
            missing += 1
            continue
        location = str(image.get("location", "unknown"))
        split = image.get("split") or _hash_split(str(image.get("seq_id", image_id)))
        frames[location].append(Frame(path, label_of[image_id], location, split))

    tasks_json = _read_json(root / "tasks.json", "tasks.json")
    tasks = {role: [str(loc) for loc in tasks_json.get(role, [])] for role in ROLES}
    tasks["interp_sources"] = tasks_json.get("interp_sources", {})
    for role in ROLES:
        for location in tasks[role]:
            if not frames.get(location):
                raise DataError(f"location {location!r} ({role} in tasks.json) has no usable frames in {root}")
    if not tasks["pretrain"] or not tasks["seen"]:
        raise DataError(f"{root / 'tasks.json'}: needs at least one 'pretrain' and one 'seen' location")

    categories = [names[cid] for cid in category_ids]
    return CCTDataset(root, categories, dict(frames), tasks, missing=missing, unlabelled=unlabelled)
