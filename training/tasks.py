"""Roles for a dataset without tasks.json, derived from label counts and backgrounds by fixed rules.

Real camera-trap sets come without our `tasks.json`, so `assign_roles` derives one (TaskRules):

1. A location's size is its number of labelled non-empty frames (on disk, not flagged corrupt).
2. Locations smaller than `min_frames`, and locations without any background (no file under
   `backgrounds/<location>/` and no empty frame in the train or val split), are `pretrain`: they still
   teach the backbone, but cannot be a task conditioned on a background.
3. The others, largest first (ties by name), are dealt roles by repeating `pattern` (S = seen,
   P = pretrain, H = held out): with "SSPSHSSPSH", 60% seen, 20% pretrain, 20% held out, the largest
   location is seen, and every role gets locations of every size. If no location ends up in pretrain,
   the smallest seen one moves there.
4. Held-out locations are placed in a cheap appearance space: 16x16 RGB thumbnails of their
   backgrounds, or of their empty frames. For a held-out location L, the seen pair A, B whose midpoint
   is nearest to L are its candidate sources (what the `midpoint` baseline blends). L is `interp` when
   it lies between them: the angle A-L-B is at least `interp_angle` degrees (90: L inside the sphere
   whose diameter is AB; an unrelated point almost never is). The pair counts as similar ("high")
   when |A - B| is at most the median distance between seen locations, else "low". The other held-out
   locations are `unseen`. If none qualifies, there are no interp tasks and RQ2 is skipped (a note says so).
   Pixel thumbnails are a rough proxy for what an adapter depends on. On the synthetic smoke world,
   where the truth is known, this rule finds both interp locations and the exact source pair of one
   (one source of the other), but also calls one of the two unseen locations interp.

The roles, the rules and each location's size go to STORE/tasks.json (the CLI writes it). To change
them, edit a copy and pass it with `--tasks`, or put it in the dataset folder as tasks.json.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from model_store.backbone import to_uint8
from training.data import CCTDataset, DataError, read_image

ROLE_OF = {"S": "seen", "P": "pretrain", "H": "held out"}


@dataclass
class TaskRules:
    min_frames: int = 20  # labelled non-empty frames a location needs to be more than a pretrain location
    pattern: str = "SSPSHSSPSH"  # roles dealt down the size ranking (rule 3)
    interp_angle: float = 90.0  # degrees; angle A-L-B at which L counts as between A and B
    thumbnail: int = 16  # side of the thumbnails that place locations in appearance space
    samples: int = 8  # frames averaged into a location's thumbnail


def assign_roles(dataset: CCTDataset, rules: TaskRules | None = None) -> CCTDataset:
    """The dataset with roles: those it was read with, else derived by the rules. The derived roles are recorded in
    its spec, so a worker that reads the spec gets them without deriving them again."""
    if dataset.spec.tasks is not None:
        return dataset
    return dataset.with_roles(derive_tasks(dataset, rules), "derived tasks")


def derive_tasks(dataset: CCTDataset, rules: TaskRules | None = None) -> dict:
    """tasks.json content for `dataset` by the module's rules; adds a line per decision to `dataset.notes`."""
    rules = rules or TaskRules()
    sizes = {loc: sum(f.label != 0 for f in frames) for loc, frames in dataset.frames.items()}
    small = sorted(loc for loc, n in sizes.items() if n < rules.min_frames)
    faceless = sorted(loc for loc in sizes if loc not in small and not background_sources(dataset, loc))
    ranked = sorted((loc for loc in sizes if loc not in small and loc not in faceless), key=lambda x: (-sizes[x], x))
    dealt = {loc: ROLE_OF[rules.pattern[i % len(rules.pattern)]] for i, loc in enumerate(ranked)}
    seen = [loc for loc in ranked if dealt[loc] == "seen"]
    pretrain = small + faceless + [loc for loc in ranked if dealt[loc] == "pretrain"]
    held_out = [loc for loc in ranked if dealt[loc] == "held out"]
    if not pretrain and len(seen) > 1:
        pretrain.append(seen.pop())
    if not seen or not pretrain:
        raise DataError(
            f"cannot derive tasks for {dataset.root}: need at least two locations with {rules.min_frames} or more "
            f"labelled animal frames and empty frames (or backgrounds); write a tasks.json (docs/recipes.md)"
        )

    interp, sources = place_held_out(dataset, seen, held_out, rules)
    unseen = [loc for loc in held_out if loc not in interp]
    notes = [
        f"tasks derived from label counts (no tasks.json): {len(pretrain)} pretrain, {len(seen)} seen, "
        f"{len(interp)} interp, {len(unseen)} unseen; recorded in STORE/tasks.json"
    ]
    if small or faceless:
        notes.append(
            f"pretrain only: {len(small)} locations with fewer than {rules.min_frames} animal frames, "
            f"{len(faceless)} without empty frames"
        )
    if not held_out:
        notes.append("too few locations to hold any out: RQ2 and RQ3 are skipped")
    elif not interp:
        notes.append("no held-out location lies between two seen ones: no interp tasks, RQ2 is skipped")
    dataset.notes += notes
    return {
        "pretrain": sorted(pretrain),
        "seen": sorted(seen),
        "interp": sorted(interp),
        "unseen": sorted(unseen),
        "interp_sources": sources,
        "derived": {"rules": asdict(rules), "animal_frames": dict(sorted(sizes.items())), "notes": notes},
    }


def place_held_out(
    dataset: CCTDataset, seen: list[str], held_out: list[str], rules: TaskRules
) -> tuple[list[str], dict[str, list[str]]]:
    """Rule 4: the held-out locations that lie between two seen ones, and their (a, b, similarity) sources."""
    if len(seen) < 2 or not held_out:
        return [], {}
    points = {loc: appearance(dataset, loc, rules) for loc in seen + held_out}
    pairs = list(itertools.combinations(seen, 2))
    spans = {pair: float(np.linalg.norm(points[pair[0]] - points[pair[1]])) for pair in pairs}
    typical = float(np.median(list(spans.values())))
    limit = np.cos(np.radians(rules.interp_angle))
    interp, sources = [], {}
    for loc in held_out:
        a, b = min(
            pairs, key=lambda pair: (np.linalg.norm(points[loc] - (points[pair[0]] + points[pair[1]]) / 2), pair)
        )
        if _cosine(points[a] - points[loc], points[b] - points[loc]) <= limit:  # the angle A-L-B is wide enough
            interp.append(loc)
            sources[loc] = [a, b, "high" if spans[(a, b)] <= typical else "low"]
    return interp, sources


def appearance(dataset: CCTDataset, location: str, rules: TaskRules) -> np.ndarray:
    """Mean thumbnail (flat, 0-1) of a location's backgrounds, or of its empty train/val frames."""
    paths = background_sources(dataset, location)
    picked = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, min(rules.samples, len(paths)))]
    images = [image for image in (read_image(path, rules.thumbnail) for path in picked) if image is not None]
    if not images:
        raise DataError(f"location {location!r}: none of its background or empty frames can be read")
    return np.mean([to_uint8(image, rules.thumbnail).ravel() / 255.0 for image in images], axis=0)


def background_sources(dataset: CCTDataset, location: str) -> list[Path]:
    """A location's background files, else its empty train/val frames (what its backgrounds will be made of)."""
    return dataset.backgrounds(location) or [
        f.file for f in dataset.frames[location] if f.label == 0 and f.split != "test"
    ]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
