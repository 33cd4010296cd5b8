"""Baselines and novelty metrics that every generated adapter is shown beside (docs/design.md, evaluation).

Published parameter generators often collapse onto something much cheaper: the average of the training
checkpoints, retrieval of the nearest task, a blend of a few neighbours, a plain regression, or a noisy
copy (Zeng et al. 2025, "generative models of weights memorise"). Each of those is built here from the
same seen-location zoo the generator learned from, as flat adapter vectors (flatten order of
`model_store.lora.adapter_shapes`). Everything is a plain tensor function, so tests can check each one
against a closed-form answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model_store import retrieval
from model_store.condition import standardize
from training.evaluation.config import HypernetConfig
from training.zoo import Zoo


@dataclass
class LocationIndex:
    """Stored condition embeddings of the seen locations' training frames, for retrieval.

    Features are z-scored and compared by Euclidean distance, as `Generator.nearest_location` does; a
    location's distance is that of its closest stored frame.
    """

    features: torch.Tensor  # (F, D) raw condition features
    owner: torch.Tensor  # (F,) index into the zoo's locations
    mean: torch.Tensor | None = None  # (D,) z-scoring statistics; default: the features' own
    std: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = self.features.mean(0)
            self.std = self.features.std(0).clamp_min(1e-6) if len(self.features) > 1 else torch.ones_like(self.mean)

    def distances(self, feature: torch.Tensor) -> torch.Tensor:
        """(D,) query -> (L,) distance to every location (its nearest training frame)."""
        d = torch.cdist(
            standardize(feature[None], self.mean, self.std).double(),
            standardize(self.features, self.mean, self.std).double(),
        )[0]
        n = int(self.owner.max()) + 1
        return torch.full((n,), float("inf"), dtype=torch.float64).scatter_reduce(0, self.owner, d, "amin").float()


# -----------------------------------------------------------------------------
# baselines: one flat adapter, or a batch of sampled ones


def average(zoo: Zoo) -> torch.Tensor:
    """Mean of ALL seen checkpoints; ignores the condition."""
    return zoo.vectors.mean(0)


def nearest(zoo: Zoo, distances: torch.Tensor) -> torch.Tensor:
    """Mean checkpoint of the seen location whose stored embedding is closest (retrieval)."""
    return retrieval.nearest(zoo.means, distances)


def knn_blend(zoo: Zoo, distances: torch.Tensor, k: int, weighting: str) -> torch.Tensor:
    """Mix of the k nearest locations' mean adapters, as the service serves it (`model_store.retrieval`)."""
    return retrieval.knn_blend(zoo.means, distances, k, weighting)


def midpoint(zoo: Zoo, a: str, b: str) -> torch.Tensor:
    """Interp oracle: the mean of the two source locations' mean adapters."""
    return 0.5 * (zoo.mean_of(a) + zoo.mean_of(b))


def noise(zoo: Zoo, location: str, sigma: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, P): random checkpoints of `location` plus Gaussian noise of `sigma` z-score units."""
    checkpoints = zoo.of(location)
    picks = checkpoints[torch.randint(len(checkpoints), (n,), generator=generator)]
    return picks + sigma * zoo.scale * torch.randn(picks.shape, generator=generator)


def gaussian(zoo: Zoo, location: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, P): samples of a per-coordinate Gaussian fitted to `location`'s checkpoints."""
    checkpoints = zoo.of(location)
    std = checkpoints.std(0) if len(checkpoints) > 1 else torch.zeros_like(checkpoints[0])
    return checkpoints.mean(0) + std * torch.randn((n, checkpoints.shape[1]), generator=generator)


# -----------------------------------------------------------------------------
# hypernet: a deterministic regression from the same condition features to the adapter


class Hypernet(nn.Module):
    """Condition features (D,) -> z-scored adapter (P,), un-normalised on the way out."""

    def __init__(self, index: LocationIndex, zoo: Zoo, hidden: int):
        super().__init__()
        self.index, self.zoo_mean, self.zoo_scale = index, zoo.vectors.mean(0), zoo.scale
        dim, params = index.features.shape[1], zoo.vectors.shape[1]
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, params)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = self.net(standardize(features, self.index.mean, self.index.std))
        return self.zoo_mean + z * self.zoo_scale


def fit_hypernet(index: LocationIndex, zoo: Zoo, config: HypernetConfig) -> Hypernet:
    """Train on the generator's pairs: (training frame of a location, a checkpoint of that location), MSE.

    Regression to the z-scored checkpoints learns each location's conditional mean adapter.
    """
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    model = Hypernet(index, zoo, config.hidden)
    optimizer = torch.optim.AdamW(model.net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    targets = (zoo.vectors - model.zoo_mean) / model.zoo_scale
    # Checkpoints grouped by location, so a random checkpoint of each frame's location is one gather.
    order = zoo.owner.argsort(stable=True)
    counts = torch.bincount(zoo.owner, minlength=len(zoo.locations))
    starts = counts.cumsum(0) - counts
    for _ in range(config.steps):
        frames = torch.randint(len(index.features), (config.batch_size,), generator=generator)
        owner = index.owner[frames]
        offset = (torch.rand(config.batch_size, generator=generator) * counts[owner]).long()
        picks = order[starts[owner] + offset]
        z = model.net(standardize(index.features[frames], index.mean, index.std))
        loss = nn.functional.mse_loss(z, targets[picks])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.requires_grad_(False).eval()


# -----------------------------------------------------------------------------
# novelty: is a generated adapter new, or a replica of a training checkpoint?


def typical_nn_distance(zoo: Zoo) -> float:
    """Median distance (z-scored L2) from a training checkpoint to its nearest other training checkpoint."""
    z = zoo.vectors / zoo.scale
    d = torch.cdist(z.double(), z.double())
    d.fill_diagonal_(float("inf"))
    return float(d.min(1).values.median())


def location_spacing(zoo: Zoo) -> float:
    """Median distance (z-scored L2) from a location's mean adapter to the nearest other location's mean:
    the scale against which `nn_l2_ratio` tells a new location's adapter from a copy of a seen one."""
    if len(zoo.locations) < 2:
        return float("nan")
    z = zoo.means / zoo.scale
    d = torch.cdist(z.double(), z.double())
    d.fill_diagonal_(float("inf"))
    return float(d.min(1).values.median())


def nn_distances(vectors: torch.Tensor, zoo: Zoo) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, P) -> z-scored L2 distance to the nearest training checkpoint (G,) and its index (G,)."""
    d = torch.cdist((vectors / zoo.scale).double(), (zoo.vectors / zoo.scale).double())
    value, index = d.min(1)
    return value.float(), index


def nn_l2_ratio(vectors: torch.Tensor, zoo: Zoo, typical: float) -> torch.Tensor:
    """(G,) distance to the nearest training checkpoint over the typical one.

    About 1: as new as one more fine-tuning step; near 0: a replica."""
    return nn_distances(vectors, zoo)[0] / max(typical, 1e-12)


def max_iou(wrong: torch.Tensor, training_wrong: torch.Tensor) -> torch.Tensor:
    """(G, N), (C, N) bool wrong-prediction masks on the same frames -> (G,) highest IoU with any training one.

    Two models that are both never wrong count as identical (IoU 1).
    """
    a, b = wrong.double(), training_wrong.double()
    intersection = a @ b.T
    union = a.sum(1, keepdim=True) + b.sum(1) - intersection
    iou = torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))
    return iou.max(1).values.float()
