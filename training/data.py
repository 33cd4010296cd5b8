"""Reader for COCO Camera Traps folders: the one way every stage, zoo worker and benchmark gets frames.

A dataset folder holds `annotations.json` (images with a `location` and `seq_id`, annotations,
categories), image files, and optionally `backgrounds/<location>/*.png` and `tasks.json` naming which
locations play which role (pretrain / seen / interp / unseen).

A `DatasetSpec` (folder, image folder, roles, backgrounds, classes) determines a dataset; `read_dataset`
reads it and returns the dataset with its spec resolved (image folder found, files read, roles checked),
so a worker handed that spec reads exactly the parent's classes, labels, roles and backgrounds.

Image files: `file_name` is relative to the image folder, by default the dataset folder, or its `images/`
when that is where the listed files are (LILA ships metadata and images apart; COCO-style folders keep
the images in `images/`). When most listed files are missing there, reading stops with a message that
says how many and where it looked; files missing in folders that do not exist at all (seasons not
downloaded) do not count against that, as long as some files are found.

Real CCT data (LILA and others) varies; what the reader accepts and does:
- image ids, category ids and locations may be integers or strings. A location becomes a string in
  which every character other than letters, digits, `.`, `_` and `-` is replaced by `_` (locations
  name folders in the store); two locations that become the same name are an error;
- the empty class: every category named empty / blank / nothing / none / no animal (any case, `_` or
  `-` for spaces), or, if none is so named, category id 0 (the CCT convention). They merge into class
  0, "empty"; the other categories follow in id order;
- several annotations on one image: an animal wins over empty, the first listed animal over later ones;
- sequence-level labels: an annotation that names a `seq_id` instead of an image, or one flagged
  `sequence_level_annotation` on an image of a sequence, labels every frame of that sequence that has
  no annotation of its own. (LILA sets already copy such labels onto every frame, so a frame labelled
  "zebra" may show an animal that has left; nothing here can tell.)
- images flagged `corrupt`, listed files that are missing, and files that cannot be decoded are
  skipped and counted, never fatal. Images of any size are resized to the backbone's input on loading;
- `classes` (a list of category names, or a JSON file of one) keeps only those categories, in that order
  after "empty" (e.g. the paper's 19 classes out of Snapshot Serengeti's 61); frames labelled with any
  other category are skipped and counted as `other_class`.

Splits: an image's own `split` field when present (the synthetic world writes one), else a hash of
its `seq_id`, so frames of one sequence never straddle train and test.

Roles: the spec's dict or file, else the folder's `tasks.json`; with neither, the dataset has no roles
and `training.tasks.assign_roles` derives them from label counts by fixed rules.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from model_store.backbone import to_uint8
from model_store.store import Store

ROLES = ("pretrain", "seen", "interp", "unseen")
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = {"train": 0.6, "val": 0.15}  # test takes the rest
EMPTY_NAMES = {"empty", "blank", "nothing", "none", "no animal"}  # compared lower-case, "_" and "-" as spaces
IMAGE_ROOT_SAMPLE = 256  # listed files checked to tell whether they lie in the dataset folder or in its images/


class DataError(Exception):
    """A dataset folder that cannot be used; the message says what is wrong and where."""


@dataclass(frozen=True)
class Frame:
    file: Path
    label: int  # index into CCTDataset.categories
    location: str
    split: str
    datetime: str = ""  # as written in the data ("2011-07-17 11:29:30"); "" when unknown


@dataclass(frozen=True)
class DatasetSpec:
    """What determines a dataset. Paths and lists given as strings are converted; `tasks` and `classes` may name a
    JSON file, which `read_dataset` reads once and replaces by its content in the dataset's resolved spec."""

    root: Path
    images: Path | None = None  # folder that `file_name`s are relative to; None: root, or root/images (module doc)
    tasks: dict | Path | None = None  # roles (tasks.json content) or a tasks file; None: root/tasks.json if present
    backgrounds: Path | None = None  # folder of <location>/*.png; None: root/backgrounds
    classes: tuple[str, ...] | Path | None = None  # categories kept after "empty", in this order; None: all

    def __post_init__(self) -> None:
        convert = {
            "root": Path(self.root),
            "images": None if self.images is None else Path(self.images),
            "tasks": Path(self.tasks) if isinstance(self.tasks, str) else self.tasks,
            "backgrounds": None if self.backgrounds is None else Path(self.backgrounds),
            "classes": Path(self.classes) if isinstance(self.classes, str) else self.classes,
        }
        if isinstance(self.classes, list):
            convert["classes"] = tuple(self.classes)
        for name, value in convert.items():
            object.__setattr__(self, name, value)

    @classmethod
    def of_store(cls, root: str | Path, store: Store, images: str | Path | None = None) -> DatasetSpec:
        """The spec a store was built with, over the dataset at `root`: the roles in STORE/tasks.json, the store's
        classes and its derived backgrounds (where it has them)."""
        classes = store.manifest.get("classes") or []
        derived = any(relpath.startswith("backgrounds/") for relpath in store.manifest["files"])
        return cls(
            root,
            images,
            store.load_json("tasks.json") if store.has("tasks.json") else None,
            store.path("backgrounds") if derived else None,
            tuple(classes[1:]) if classes else None,
        )


@dataclass
class CCTDataset:
    spec: DatasetSpec  # resolved (`read_dataset`): what a worker reads to get this same dataset
    categories: list[str]  # contiguous class index -> name; index 0 is the empty class
    frames: dict[str, list[Frame]]  # location -> frames
    tasks: dict[str, list[str]]
    missing: int = 0  # listed files not on disk, skipped
    unlabelled: int = 0  # images without an annotation, skipped
    corrupt: int = 0  # images flagged `corrupt` in the metadata, skipped
    other_class: int = 0  # images of a category left out by `classes`, skipped
    unreadable: Counter = field(default_factory=Counter)  # location -> corrupt files met while loading
    notes: list[str] = field(default_factory=list)  # what the reader decided that the user should know

    @property
    def root(self) -> Path:
        return self.spec.root

    def with_roles(self, raw: dict, where: str) -> CCTDataset:
        """This dataset with the roles `raw` (tasks.json content, checked here), also recorded in its spec."""
        tasks = _check_tasks(raw, self, where)
        return replace(self, spec=replace(self.spec, tasks=tasks), tasks=tasks)

    def label_digest(self, location: str) -> str:
        """sha256 of the class list and every frame's file, label and split at `location`: what a zoo worker records
        so that the parent can tell it saw the same labels."""
        frames = [[str(f.file), f.label, f.split] for f in self.frames.get(location, [])]
        return hashlib.sha256(json.dumps([self.categories, frames]).encode()).hexdigest()

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
        folder = (self.spec.backgrounds or self.root / "backgrounds") / location
        return sorted(p for p in folder.glob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})

    def _load(self, frames: list[Frame], image_size: int, location: str) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, labels = [], []
        for frame in frames:
            image = read_image(frame.file, image_size)
            if image is None:
                self.unreadable[location] += 1
                continue
            pixels.append(to_uint8(image, image_size))
            labels.append(frame.label)
        if not pixels:
            return torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
        return torch.from_numpy(np.stack(pixels)), torch.tensor(labels, dtype=torch.long)

    def summary(self) -> str:
        unreadable = sum(self.unreadable.values())
        skipped = self.corrupt + self.missing + self.unlabelled + self.other_class + unreadable
        other = f", other class {self.other_class}" if self.other_class else ""
        return (
            f"{sum(len(v) for v in self.frames.values())} frames in {len(self.frames)} locations, "
            f"{len(self.categories)} classes; skipped {skipped} (corrupt {self.corrupt}, missing {self.missing}, "
            f"unlabelled {self.unlabelled}{other}, unreadable {unreadable})"
        )


def read_image(path: Path, size: int | None = None) -> Image.Image | None:
    """A fully decoded image, or None if the file is missing, truncated or not an image.

    With `size`, a JPEG may be decoded at a reduced scale that still covers size x size pixels (much
    faster for multi-megapixel camera-trap frames that are resized to the backbone's input anyway).
    """
    try:
        with Image.open(path) as image:
            if size is not None:
                image.draft("RGB", (size, size))
            image.load()
            return image.copy()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None


def location_name(raw) -> str:
    """A location id from the data (string or integer) -> the name used for folders and in tasks.json."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(raw)) or "_"


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


def read_dataset(spec: DatasetSpec) -> CCTDataset:
    """The dataset `spec` names, with its spec resolved; raises DataError with a clear message on unusable input.

    Without roles (no `spec.tasks`, no tasks.json in the folder) the dataset has none (`tasks` empty, `spec.tasks`
    None): `training.tasks.assign_roles` derives them.
    """
    root = spec.root
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    where = root / "annotations.json"
    coco = _read_json(where, "annotations.json")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise DataError(f"{where}: missing or malformed '{key}' list")
    classes = _read_classes(spec.classes)
    try:
        categories, class_of, notes = _classes(coco["categories"], classes)
        images: dict[str, dict] = {}
        for image in coco["images"]:
            image_id = str(image["id"])
            if image_id in images:
                raise DataError(f"{where}: image id {image['id']!r} is listed twice")
            images[image_id] = image
        labels = _labels(coco["annotations"], images, class_of, where)
    except (KeyError, TypeError) as err:
        raise DataError(f"{where}: malformed entry (missing or wrong field {err})") from None

    image_root = spec.images or _image_root(root, list(images.values()))
    frames, skipped = _frames(images, labels, image_root, where)
    dataset = CCTDataset(
        replace(spec, images=image_root, tasks=None, classes=classes),
        categories,
        frames,
        {},
        missing=skipped["missing"],
        unlabelled=skipped["unlabelled"],
        corrupt=skipped["corrupt"],
        other_class=skipped["other_class"],
        notes=notes,
    )
    tasks = spec.tasks
    if tasks is None and (root / "tasks.json").is_file():
        tasks = root / "tasks.json"
    if tasks is None:
        return dataset
    if isinstance(tasks, dict):
        return dataset.with_roles(tasks, "tasks")
    return dataset.with_roles(_read_json(tasks, "tasks file"), str(tasks))


def read_cct(
    root: str | Path,
    tasks: dict | str | Path | None = None,
    backgrounds: str | Path | None = None,
    classes: list[str] | str | Path | None = None,
    images: str | Path | None = None,
) -> CCTDataset:
    """`read_dataset` of the spec these arguments make (roles only from `tasks` or the folder's tasks.json)."""
    return read_dataset(DatasetSpec(root, images, tasks, backgrounds, classes))


def _read_classes(classes: tuple[str, ...] | Path | None) -> tuple[str, ...] | None:
    if not isinstance(classes, Path):
        return classes
    names = _read_json(classes, "classes file")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise DataError(f"classes file: expected a JSON list of category names, got {type(names).__name__}")
    return tuple(names)


def _image_root(root: Path, images: list[dict]) -> Path:
    """root/images when it holds more of a sample of the listed files than root itself, else root."""
    nested = root / "images"
    if not nested.is_dir():
        return root
    step = max(1, len(images) // IMAGE_ROOT_SAMPLE)
    names = [str(image.get("file_name") or "") for image in images[::step]]
    found = {folder: sum(bool(name) and (folder / name).is_file() for name in names) for folder in (root, nested)}
    return nested if found[nested] > found[root] else root


def _frames(
    images: dict[str, dict], labels: dict[str, int | None], image_root: Path, where: Path
) -> tuple[dict[str, list[Frame]], Counter]:
    """Location -> its usable frames, and the counts of what was skipped; stops when most files are missing."""
    frames: dict[str, list[Frame]] = defaultdict(list)
    spellings: dict[str, set[str]] = defaultdict(set)  # location name -> the ids in the data it came from
    skipped = Counter()
    folders: dict[Path, bool] = {}  # folder -> exists
    for image_id, image in images.items():
        if image.get("corrupt"):
            skipped["corrupt"] += 1
            continue
        if image_id not in labels:
            skipped["unlabelled"] += 1
            continue
        if labels[image_id] is None:
            skipped["other_class"] += 1
            continue
        path = image_root / str(image.get("file_name", ""))
        if not image.get("file_name") or not path.is_file():
            skipped["missing"] += 1
            if folders.setdefault(path.parent, path.parent.is_dir()):
                skipped["missing_in_folder"] += 1
            continue
        raw = str(image.get("location", "unknown"))
        location = location_name(raw)
        spellings[location].add(raw)
        split = image.get("split") or _hash_split(str(image.get("seq_id", image_id)))
        frames[location].append(Frame(path, labels[image_id], location, split, str(image.get("datetime") or "")))
    found = sum(len(v) for v in frames.values())
    if skipped["missing"] and (not found or skipped["missing_in_folder"] > found):
        raise DataError(
            f"{skipped['missing']} of {skipped['missing'] + found} listed image files are missing under {image_root} "
            f"(the folder the file_name paths of {where.name} were looked up in); pass --images DIR, the folder "
            "they are relative to"
        )
    for location, raws in spellings.items():
        if len(raws) > 1:
            listed = ", ".join(repr(r) for r in sorted(raws))
            raise DataError(f"{where}: locations {listed} all become {location!r}; rename them in the data")
    return dict(frames), skipped


def _classes(
    categories: list[dict], keep: tuple[str, ...] | None
) -> tuple[list[str], dict[str, int | None], list[str]]:
    """CCT categories -> class names (index 0 = "empty"), category id (as a string) -> class index (None: a
    category left out by `keep`), notes."""
    names = {str(c["id"]): str(c["name"]) for c in categories}
    empty = [cid for cid, name in names.items() if re.sub(r"[_-]", " ", name.strip().lower()) in EMPTY_NAMES]
    notes = []
    if not empty and "0" in names:
        empty = ["0"]
    if not empty:
        notes.append("no empty category (named empty/blank/... or id 0): class 0 'empty' has no frames")
    others = sorted((cid for cid in names if cid not in empty), key=lambda c: (0, int(c)) if c.isdigit() else (1, c))
    if keep is not None:
        by_name = {names[cid].strip().lower(): cid for cid in [*empty, *others]}
        unknown = [name for name in keep if name.strip().lower() not in by_name]
        if unknown:
            raise DataError(f"classes not among the categories: {unknown}; the categories are {sorted(names.values())}")
        kept = [cid for cid in dict.fromkeys(by_name[name.strip().lower()] for name in keep) if cid not in empty]
        class_of = dict.fromkeys(empty, 0) | dict.fromkeys(others) | {cid: i + 1 for i, cid in enumerate(kept)}
        return ["empty", *(names[cid] for cid in kept)], class_of, notes
    class_of = dict.fromkeys(empty, 0) | {cid: i + 1 for i, cid in enumerate(others)}
    return ["empty", *(names[cid] for cid in others)], class_of, notes


def _labels(
    annotations: list[dict], images: dict[str, dict], class_of: dict[str, int | None], where: Path
) -> dict[str, int | None]:
    """Image id -> class index (None: a left-out category), from the image's own annotations, else its sequence's."""
    own: dict[str, list[int]] = defaultdict(list)
    by_sequence: dict[str, list[int]] = defaultdict(list)
    unknown = Counter()
    for ann in annotations:
        category = str(ann["category_id"])
        if category not in class_of:
            unknown[category] += 1
            continue
        image = images.get(str(ann.get("image_id")))
        if image is not None:
            own[str(image["id"])].append(class_of[category])
            if ann.get("sequence_level_annotation") and image.get("seq_id") is not None:
                by_sequence[str(image["seq_id"])].append(class_of[category])
        elif ann.get("seq_id") is not None:
            by_sequence[str(ann["seq_id"])].append(class_of[category])
    if unknown:
        listed = ", ".join(f"{cid} ({n}x)" for cid, n in sorted(unknown.items()))
        raise DataError(f"{where}: annotations use unknown category ids: {listed}")

    labels = {}
    for image_id, image in images.items():
        classes = own.get(image_id) or by_sequence.get(str(image.get("seq_id")), [])
        if classes:
            # an animal wins over empty; a category left out (None) counts as an animal: the frame is not empty
            labels[image_id] = next((c for c in classes if c != 0), 0)
    return labels


def _check_tasks(raw: dict, dataset: CCTDataset, where: str) -> dict:
    """Roles as location names of this dataset; every listed location must have frames, none two roles."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object with the keys {', '.join(ROLES)}")
    tasks = {role: [location_name(loc) for loc in raw.get(role, [])] for role in ROLES}
    if "derived" in raw:
        tasks["derived"] = raw["derived"]  # how derived roles came about, kept for STORE/tasks.json
    tasks["interp_sources"] = {
        location_name(loc): [location_name(a), location_name(b), *rest]
        for loc, (a, b, *rest) in raw.get("interp_sources", {}).items()
    }
    roles_of = defaultdict(list)
    for role in ROLES:
        for location in tasks[role]:
            roles_of[location].append(role)
            if not dataset.frames.get(location):
                raise DataError(f"location {location!r} ({role} in {where}) has no usable frames in {dataset.root}")
    twice = {loc: roles for loc, roles in roles_of.items() if len(roles) > 1}
    if twice:
        raise DataError(f"{where}: locations with more than one role: {twice}")
    if not tasks["pretrain"] or not tasks["seen"]:
        raise DataError(f"{where}: needs at least one 'pretrain' and one 'seen' location")
    return tasks
