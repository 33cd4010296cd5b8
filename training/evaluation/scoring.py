"""Labelled frames, the one scorer of flat adapters, and the only code that chooses anything (val only)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model_store.backbone import BackboneConfig, Classifier, normalize
from model_store.lora import LoraLayout, adapter_predictions, unflatten
from training.data import CCTDataset


@dataclass(frozen=True)
class Frames:
    """One location's labelled frames of one split, normalised once."""

    location: str
    split: str  # "train" | "val" | "test"
    pixels: torch.Tensor  # (N, 3, S, S)
    labels: torch.Tensor  # (N,)


def load_frames(dataset: CCTDataset, location: str, split: str, backbone: BackboneConfig) -> Frames:
    pixels, labels = dataset.load(location, split, backbone.image_size)
    return Frames(location, split, normalize(pixels, backbone), labels)


class Scorer:
    """Accuracy of many flat adapters on a location's frames (`model_store.lora.adapter_predictions`)."""

    def __init__(self, classifier: Classifier, layout: LoraLayout, shapes: dict[str, tuple[int, ...]]):
        self.classifier, self.layout, self.shapes = classifier, layout, shapes

    def wrong(self, vectors: torch.Tensor, frames: Frames) -> torch.Tensor:
        """(A, P) adapters -> (A, N) bool: which frames each adapter gets wrong."""
        rows = [
            adapter_predictions(self.classifier, unflatten(vector, self.shapes), self.layout, frames.pixels)
            != frames.labels
            for vector in vectors
        ]
        return torch.stack(rows) if rows else torch.zeros((0, len(frames.labels)), dtype=torch.bool)

    def accuracy(self, vectors: torch.Tensor, frames: Frames) -> torch.Tensor:
        """(A, P) -> (A,) accuracies."""
        return 1.0 - self.wrong(vectors, frames).double().mean(1)


# -----------------------------------------------------------------------------
# selection: it only ever sees val


def require_val(frames: Frames) -> None:
    if frames.split != "val":
        raise ValueError(f"selection must use val frames, got the {frames.split!r} split of {frames.location}")


def select_sample(scorer: Scorer, candidates: torch.Tensor, val: Frames) -> int:
    """Index of the candidate adapter with the best val accuracy (first on ties)."""
    require_val(val)
    return int(scorer.accuracy(candidates, val).argmax())


def best_on_val(val_accs: Sequence[float]) -> int:
    """Index of the fine-tuned checkpoint with the best recorded val accuracy (first on ties)."""
    return max(range(len(val_accs)), key=lambda i: (val_accs[i], -i))


def choose_option(scorer: Scorer, options: dict[str, list[torch.Tensor]], vals: list[Frames]) -> str:
    """The option whose adapters score the best mean val accuracy over a role's locations.

    `options[name][i]` holds the (A, P) adapters that option gives location i (mean over the A)."""
    for val in vals:
        require_val(val)

    def score(name: str) -> float:
        return statistics.fmean(
            float(scorer.accuracy(adapters, val).mean()) for adapters, val in zip(options[name], vals, strict=True)
        )

    return max(options, key=score)  # first listed option wins ties
