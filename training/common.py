"""Small helpers shared by the training stages: seeding, batching, accuracy, and the one up-to-date rule."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import torch

from model_store.backbone import BackboneConfig, normalize


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips: animals face either way, backgrounds stay plausible."""
    flip = torch.rand(pixels.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)


@torch.no_grad()
def predict(
    model: torch.nn.Module, pixels: torch.Tensor, config: BackboneConfig, batch_size: int = 512
) -> torch.Tensor:
    """(N, 3, S, S) uint8 -> (N,) predicted class indices."""
    model.eval()
    out = [model(normalize(pixels[i : i + batch_size], config)).argmax(-1) for i in range(0, len(pixels), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, config: BackboneConfig) -> float:
    if len(labels) == 0:
        return float("nan")
    return (predict(model, pixels, config) == labels).float().mean().item()


def config_key(config: dict, inputs: dict[str, str], data: dict[str, str] | None = None) -> str:
    """The key of a result: a hash of the resolved config it was made with and of its inputs (name -> sha256).

    The one rule for "is this up to date" (pipeline stages, studies' sub-stores): a result is current when its
    recorded key equals the key of what would make it now. Hashing the whole resolved config, not chosen
    fields, means a new config field can never be forgotten. `data`: the dataset's fingerprint, if it matters."""
    material = {"config": config, "inputs": inputs} | ({"data": data} if data is not None else {})
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()
