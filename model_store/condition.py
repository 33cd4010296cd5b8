"""The condition encoder: one background frame of a location -> a feature vector the denoiser is conditioned on.

A frozen open_clip image tower. In the synthetic world it is the store's pretrained backbone tower (no CLIP
weights can ship); a separate tower from local weights is a later option of `ConditionConfig.source`.

Which features? A classifier trained with an `empty` class learns to map every empty frame to nearly the
same final embedding, which would blind the generator to the location. Patch tokens after an early block
still describe the scene (palette, colour cast, horizon, occluders), so the default is the mean-pooled tokens
after block 1; `features="final"` is the tower's pooled output. The choice was made by measuring how well the
features of held-out frames identify their location (`location_identification`; numbers in the store's
manifest and `fit/metrics.json`).

Background frames of a location are split once, by `split_backgrounds`: even positions in the sorted file list
train the generator and are stored as reference embeddings, odd positions are held out ("fresh") for
measurement. Evaluation imports the same function so it never measures on a training frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from torch import nn

from model_store.backbone import BackboneConfig, Classifier, preprocess, to_uint8

CONDITIONS_FILE = "conditions.safetensors"

T = TypeVar("T")


@dataclass
class ConditionConfig:
    source: str = "backbone"  # "backbone": the store's pretrained tower (the only source so far)
    features: str = "block"  # "block": mean-pooled patch tokens after `block` | "final": pooled tower output
    block: int = 1  # 0-based transformer block whose output tokens are pooled (features="block")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ConditionConfig:
        return cls(**data)


class ConditionEncoder(nn.Module):
    """Frozen tower: (B, 3, S, S) normalised pixels -> (B, D) features."""

    def __init__(self, classifier: Classifier, backbone_config: BackboneConfig, config: ConditionConfig):
        super().__init__()
        if config.source != "backbone":
            raise ValueError(f"unknown condition source {config.source!r}: only 'backbone' is supported")
        if config.features not in ("block", "final"):
            raise ValueError(f"unknown condition features {config.features!r}: expected 'block' or 'final'")
        if config.features == "block" and not 0 <= config.block < len(classifier.blocks):
            raise ValueError(f"condition block {config.block} out of range (tower has {len(classifier.blocks)})")
        self.tower = classifier.tower
        self.backbone_config = backbone_config
        self.config = config
        self.requires_grad_(False).eval()

    @property
    def dim(self) -> int:
        return self.tower.transformer.width if self.config.features == "block" else self.tower.output_dim

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.config.features == "final":
            return self.tower(pixels)
        out = self.tower.forward_intermediates(
            pixels, indices=[self.config.block], stop_early=True, intermediates_only=True, output_fmt="NLC"
        )
        return out["image_intermediates"][0].mean(dim=1)  # (B, tokens, width) -> (B, width), class token excluded

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Pillow images of any mode and size -> (B, D) features, on the tower's device."""
        device = next(self.tower.parameters()).device
        return self(preprocess(images, self.backbone_config).to(device))


# -----------------------------------------------------------------------------
# which frames train the generator, and how well features identify a location


def split_backgrounds(paths: Sequence[T]) -> tuple[list[T], list[T]]:
    """A location's sorted background frames -> (training half: even positions, held-out "fresh": odd ones)."""
    return list(paths[0::2]), list(paths[1::2])


def is_night(image: Image.Image) -> bool:
    """Night-infrared frames are greyscale: the channels of every pixel (nearly) agree."""
    rgb = to_uint8(image, min(image.size)).astype(np.int16)
    spread = rgb.max(axis=0) - rgb.min(axis=0)  # (S, S) per-pixel channel spread
    return float(spread.mean()) < 4.0


def standardize(features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (features - mean) / std


def nearest(queries: torch.Tensor, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D), (N, D) -> Euclidean distance to the nearest reference (B,) and its index (B,)."""
    distances = torch.cdist(queries.double(), references.double())  # float64: ties resolve the same everywhere
    value, index = distances.min(dim=1)
    return value.float(), index


def location_identification(
    references: torch.Tensor, reference_locations: torch.Tensor, queries: torch.Tensor, query_locations: torch.Tensor
) -> torch.Tensor:
    """Per query: is the location of its nearest reference embedding (1-NN) its own? -> (B,) bool.

    Features are z-scored with the references' statistics first, as the generator does.
    """
    mean, std = references.mean(0), references.std(0).clamp_min(1e-6)
    _, index = nearest(standardize(queries, mean, std), standardize(references, mean, std))
    return reference_locations[index] == query_locations
