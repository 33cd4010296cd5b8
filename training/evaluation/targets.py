"""The target locations of an evaluation: each one's condition frame, labelled splits and references."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from model_store.backbone import BackboneConfig
from model_store.condition import split_backgrounds
from training.data import CCTDataset, read_image
from training.evaluation.scoring import Frames, load_frames


@dataclass
class Task:
    """One target location: its condition frame, labelled splits and fine-tuned references."""

    location: str
    role: str
    frame_name: str
    frame: Image.Image  # the fresh background frame b: the condition for generator and baselines
    val: Frames
    test: Frames
    references: list[dict]  # zoo runs fine-tuned at this location (result.json); for comparison only
    sources: tuple[str, str] | None = None  # interp: the two seen locations it mixes
    similarity: str | None = None  # interp: "high" | "low", how alike the two sources are


def read_frames(paths: Sequence[Path]) -> list[Image.Image]:
    """Readable background frames, RGB; unreadable files are skipped, as everywhere else."""
    return [image.convert("RGB") for image in map(read_image, paths) if image is not None]


def held_out_frames(dataset: CCTDataset, location: str) -> list[Image.Image]:
    """A location's held-out background frames (never seen by the generator), readable ones, RGB."""
    return read_frames(split_backgrounds(dataset.backgrounds(location))[1])


def fresh_frame(dataset: CCTDataset, location: str) -> tuple[str, Image.Image]:
    """The condition of a location: its first readable held-out background frame."""
    _, fresh = split_backgrounds(dataset.backgrounds(location))
    for path in fresh:
        image = read_image(path)
        if image is not None:
            return path.name, image.convert("RGB")
    raise ValueError(f"location {location!r} has no readable held-out background frame to condition on")


def load_tasks(dataset: CCTDataset, role: str, results: dict, backbone: BackboneConfig) -> list[Task]:
    tasks = []
    for location in dataset.locations(role):
        name, frame = fresh_frame(dataset, location)
        sources = dataset.tasks["interp_sources"].get(location) if role == "interp" else None
        tasks.append(
            Task(
                location=location,
                role=role,
                frame_name=name,
                frame=frame,
                val=load_frames(dataset, location, "val", backbone),
                test=load_frames(dataset, location, "test", backbone),
                references=results.get(location, []),
                sources=tuple(sources[:2]) if sources else None,
                similarity=sources[2] if sources and len(sources) > 2 else None,
            )
        )
    return tasks
