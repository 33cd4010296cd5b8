"""Knowing when a location is unseen, and what to serve then.

The signal is `Generator.distance`: a frame's distance to the nearest stored training-half background frame
of a seen location, ~1 typical. The threshold is CALIBRATED on the held-out ("fresh") half of the seen
locations' background frames (`model_store.condition.split_backgrounds`), which the generator never saw:

    ood_threshold = quantile(fresh distances, 0.95)

so about 5% of fresh frames of seen locations are flagged (the false-alarm rate is the one number we can
set without examples of unseen locations). `wildpdiff fit` stores it as `components.condition.ood_threshold`
in the manifest, with the rule beside it.

Out of distribution a generated adapter can be far worse than no adapter at all (measured on the unseen demo locations),
so the service's `fallback` policy serves a retrieved adapter instead: the mean zoo checkpoint of the
nearest seen location, stored at fit time in `FALLBACK_FILE` (so serving never needs the zoo or training),
or, for a store without that file, the all-zero adapter, which leaves the pretrained backbone unchanged.
"""

from __future__ import annotations

import torch

from model_store.store import Store

FALLBACK_FILE = "fallback.safetensors"  # {"vectors": (L, P)}, rows in `components.condition.locations` order
OOD_QUANTILE = 0.95


def calibrate_threshold(fresh_distances: torch.Tensor, quantile: float = OOD_QUANTILE) -> float:
    """Distances of held-out frames of SEEN locations -> the threshold that keeps `quantile` of them in."""
    if fresh_distances.numel() == 0:
        raise ValueError("no held-out background frames to calibrate the OOD threshold on")
    return float(torch.quantile(fresh_distances.double(), quantile))


def location_means(vectors: torch.Tensor, location: torch.Tensor, num_locations: int) -> torch.Tensor:
    """(N, P) checkpoints with their location index (N,) -> (L, P) per-location means."""
    counts = torch.bincount(location, minlength=num_locations)
    if (counts == 0).any():
        raise ValueError(f"location {int((counts == 0).nonzero()[0])} has no checkpoints")
    sums = torch.zeros(num_locations, vectors.shape[1], dtype=vectors.dtype).index_add_(0, location, vectors)
    return sums / counts[:, None].to(vectors.dtype)


def load_fallback(store: Store) -> torch.Tensor | None:
    """(L, P) per-location mean adapters, or None for a store fitted before they were stored."""
    return store.load_tensors(FALLBACK_FILE)["vectors"] if store.has(FALLBACK_FILE) else None
