"""Retrieval over the seen locations' mean adapters: what to serve for a location from its distances alone.

    blend = knn_blend(means, distances, k=3, weighting="inverse_distance")  # (L, P), (L,) -> (P,)

`means` are the per-location mean zoo adapters (`Generator.location_means`, rows in `Generator.locations`
order) and `distances` a frame's distance to each of those locations (`Generator.location_distances`). The
evaluation scores these same functions as baselines, so what it measures is what the service serves.
"""

from __future__ import annotations

import torch

WEIGHTINGS = ("uniform", "inverse_distance")


def neighbours(distances: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) distances to every location -> the k closest per row: distances (B, k) and location indices (B, k),
    closest first."""
    if not 1 <= k <= distances.shape[-1]:
        raise ValueError(f"k must be in 1..{distances.shape[-1]} (the locations), got {k}")
    return distances.topk(k, dim=-1, largest=False)


def nearest(means: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """(L, P), (L,) -> (P,): the mean adapter of the closest location."""
    return means[int(distances.argmin())]


def knn_blend(means: torch.Tensor, distances: torch.Tensor, k: int, weighting: str) -> torch.Tensor:
    """(L, P), (L,) -> (P,): the k closest locations' mean adapters, weighted uniformly or by 1 / distance.

    Weights are normalised to sum to 1, so the blend stays inside the span of the zoo (it cannot fall far
    below it); a distance of 0 is clamped to 1e-6, which makes that location all but the whole blend."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown knn weighting {weighting!r}: expected one of {', '.join(WEIGHTINGS)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    d, index = neighbours(distances, min(k, len(distances)))  # (k,), (k,)
    weights = torch.ones_like(d) if weighting == "uniform" else 1.0 / d.clamp_min(1e-6)
    return (weights / weights.sum()).to(means.dtype) @ means[index]
