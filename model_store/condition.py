"""The condition encoder: one background frame of a location -> a feature vector the denoiser is conditioned on.

A frozen open_clip image tower: by default the store's pretrained backbone tower (`source="backbone"`; the
synthetic world ships no CLIP weights), or a separate open_clip model from a local checkpoint
(`source="open_clip"`, e.g. CLIP ViT-B-32 or BioCLIP; `--condition MODEL --condition-weights PATH`). Only
`wildpdiff fit` reads that checkpoint: it copies the tower into the store (`condition_tower.safetensors`), so a
store never needs the original file.

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
from open_clip.transformer import VisionTransformer
from torch import nn

from model_store.backbone import BackboneConfig, Classifier, build_classifier, preprocess, to_uint8

CONDITIONS_FILE = "conditions.safetensors"
CONDITION_TOWER_FILE = "condition_tower.safetensors"  # source="open_clip" only

T = TypeVar("T")


@dataclass
class ConditionConfig:
    source: str = "backbone"  # "backbone": the store's pretrained tower | "open_clip": a tower of its own
    features: str = "block"  # "block": mean-pooled patch tokens after `block` | "final": pooled tower output
    block: int = 1  # 0-based transformer block whose output tokens are pooled (features="block")
    # source="open_clip": the tower's `BackboneConfig` (model name, local weights, vision_cfg, mean/std)
    tower: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ConditionConfig:
        return cls(**data)


class ConditionEncoder(nn.Module):
    """Frozen tower: (B, 3, S, S) normalised pixels -> (B, D) features.

    `image_config` says how images are resized and normalised for this tower (its own mean/std)."""

    def __init__(self, tower: VisionTransformer, image_config: BackboneConfig, config: ConditionConfig):
        super().__init__()
        if config.features not in ("block", "final"):
            raise ValueError(f"unknown condition features {config.features!r}: expected 'block' or 'final'")
        blocks = len(tower.transformer.resblocks)
        if config.features == "block" and not 0 <= config.block < blocks:
            raise ValueError(f"condition block {config.block} out of range (tower has {blocks})")
        self.tower = tower
        self.backbone_config = image_config
        self.config = config
        self.requires_grad_(False).eval()

    @classmethod
    def build(
        cls,
        classifier: Classifier,
        backbone_config: BackboneConfig,
        config: ConditionConfig,
        tower_state: dict[str, torch.Tensor] | None = None,
    ) -> ConditionEncoder:
        """The encoder `config` names: the classifier's own tower, or (source="open_clip") a separate tower with
        `tower_state` (a store's copy) or, when None, the weights of the local checkpoint in `config.tower`."""
        if config.source == "backbone":
            return cls(classifier.tower, backbone_config, config)
        if config.source != "open_clip":
            raise ValueError(f"unknown condition source {config.source!r}: expected 'backbone' or 'open_clip'")
        if config.tower is None:
            raise ValueError("an open_clip condition encoder needs its tower config (`open_clip_backbone`)")
        tower_config = BackboneConfig.from_dict(config.tower)
        tower = build_classifier(tower_config, pretrained=tower_state is None).tower
        if tower_state is not None:
            tower.load_state_dict(tower_state)
        return cls(tower, tower_config, config)

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
