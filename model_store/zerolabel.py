"""Zero labels: choose and adapt an adapter on a location's unlabelled frames (animals in them, no labels).

    result = zero_label(generator, candidates, frames, ZeroLabelConfig(select_margin=0.05, steps=20))

A camera's unlabelled frames carry the location's shift (colour cast, infrared, blur, distance) that the
adapter must undo. Both steps score an adapter by the information-maximisation loss of SHOT (Liang et al.,
2020) on the frames:

    loss = mean_i H(p_i) - diversity * H(mean_i p_i)

low when every frame gets a confident prediction (first term) and the frames do not all get the same class
(second term, the guard against collapsing onto one class).
1. *choose*: among `candidates` (name -> flat adapter; the first is the default that would be served without
   frames), the one with the lowest loss, but only when it beats the default's by more than `select_margin`:
   label-free selection is unreliable, so the default stays unless the evidence is clear;
2. *adapt*: `steps` Adam steps on the chosen adapter's LoRA parameters against the same loss (TENT, Wang et
   al., 2021, on the LoRA instead of normalisation layers), `batch_size` frames a step, stopped early when
   the class marginal collapses (its entropy falls below `collapse_fraction` of the start's) or `max_seconds`
   pass; the result is kept only if its loss on all the frames is lower than the start's.
Which of the two a region of condition distance uses is chosen on val by `wildpdiff evaluate` (the serving
table); the labels of the frames are never read here (there are none).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from model_store.lora import adapted_logits, unflatten


@dataclass(frozen=True)
class ZeroLabelConfig:
    select_margin: float | None = None  # None: keep the default; else the loss gap a candidate must beat it by
    steps: int = 0  # adaptation steps (0: none)
    lr: float = 3e-3
    diversity: float = 1.0  # weight of the class-marginal entropy
    batch_size: int = 64  # frames per adaptation step (a fixed rotation through all of them): bounds the cost
    collapse_fraction: float = 0.5  # stop when the marginal's entropy falls below this share of the start's
    max_seconds: float = 3.0  # adaptation stops after this long, whatever `steps` says

    def __post_init__(self):
        if self.select_margin is not None and self.select_margin < 0:
            raise ValueError(f"select_margin must be >= 0 or None, got {self.select_margin}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.lr <= 0 or self.diversity < 0 or self.max_seconds <= 0 or self.batch_size < 1:
            raise ValueError("lr, max_seconds and batch_size must be > 0 and diversity >= 0")
        if not 0.0 <= self.collapse_fraction < 1.0:
            raise ValueError(f"collapse_fraction must be in [0, 1), got {self.collapse_fraction}")

    @property
    def active(self) -> bool:
        """Whether frames change anything under this config."""
        return self.select_margin is not None or self.steps > 0


@dataclass
class ZeroLabelResult:
    vector: torch.Tensor  # (P,) the chosen (and adapted) adapter, flat
    source: str  # the candidate it started from
    losses: dict[str, float]  # candidate -> information-maximisation loss on the frames
    steps: int  # adaptation steps taken
    stopped: str  # "steps" | "collapse" | "time" | "no-gain" (the adaptation was undone) | "off"
    loss_before: float
    loss_after: float
    frames: int

    def metadata(self) -> dict[str, str]:
        return {
            "zerolabel_source": self.source,
            "zerolabel_frames": str(self.frames),
            "zerolabel_steps": str(self.steps),
            "zerolabel_stopped": self.stopped,
            "zerolabel_loss_before": f"{self.loss_before:.6f}",
            "zerolabel_loss_after": f"{self.loss_after:.6f}",
        }


def _entropy(probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    return -(probs * log_probs).sum(-1)


def information_loss(logits: torch.Tensor, diversity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) logits -> (the SHOT loss, the entropy of the class marginal), both scalars."""
    log_probs = logits.float().log_softmax(-1)
    probs = log_probs.exp()
    marginal = probs.mean(0)
    marginal_entropy = _entropy(marginal, marginal.clamp_min(1e-12).log())
    return _entropy(probs, log_probs).mean() - diversity * marginal_entropy, marginal_entropy


def _logits(generator, vector: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    state = {k: v.to(frames.device) for k, v in unflatten(vector, generator.shapes).items()}
    return adapted_logits(generator.classifier, state, generator.layout, frames)


@torch.no_grad()
def candidate_losses(generator, candidates: dict[str, torch.Tensor], frames: torch.Tensor, diversity: float):
    """name -> (P,) adapters, (N, 3, S, S) normalised frames -> name -> loss on the frames."""
    losses = {}
    for name, vector in candidates.items():
        losses[name] = information_loss(_logits(generator, vector, frames), diversity)[0].item()
    return losses


def choose(losses: dict[str, float], margin: float | None) -> str:
    """The candidate to start from: the default (first) unless another's loss is lower by more than `margin`."""
    default = next(iter(losses))
    best = min(losses, key=lambda name: (losses[name], name != default))
    if margin is None or losses[best] >= losses[default] - margin:
        return default
    return best


def adapt_unlabelled(
    generator, vector: torch.Tensor, frames: torch.Tensor, config: ZeroLabelConfig
) -> tuple[torch.Tensor, int, str, float, float]:
    """(P,) adapter, (N, 3, S, S) frames -> (adapted vector, steps taken, why it stopped, loss before, after)."""
    start = vector.detach().to(frames.device, torch.float32)
    with torch.no_grad():
        loss_before, marginal_before = information_loss(_logits(generator, start, frames), config.diversity)
    loss_before = loss_before.item()
    if config.steps == 0:
        return vector, 0, "off", loss_before, loss_before
    deadline = time.monotonic() + config.max_seconds
    current = start.clone().requires_grad_()
    optimizer = torch.optim.Adam([current], lr=config.lr)
    steps, stopped = 0, "steps"
    floor = config.collapse_fraction * marginal_before.item()
    # A fixed rotation through the frames: the same frames (in the same order) give the same steps.
    order = torch.randperm(len(frames), generator=torch.Generator().manual_seed(0)).to(frames.device)
    batch = torch.arange(min(config.batch_size, len(frames)), device=frames.device)
    while steps < config.steps:
        if time.monotonic() > deadline:
            stopped = "time"
            break
        rows = order[(steps * len(batch) + batch) % len(frames)]
        loss, marginal_entropy = information_loss(_logits(generator, current, frames[rows]), config.diversity)
        if marginal_entropy.item() < floor:
            stopped = "collapse"
            break
        # autograd.grad, not backward: the shared classifier's own parameters must collect no gradients
        (current.grad,) = torch.autograd.grad(loss, [current])
        optimizer.step()
        steps += 1
    adapted = current.detach()
    with torch.no_grad():
        loss_after, marginal_after = information_loss(_logits(generator, adapted, frames), config.diversity)
    if stopped == "collapse" or marginal_after.item() < floor:
        return vector, steps, "collapse", loss_before, loss_before
    if not loss_after.item() < loss_before:
        return vector, steps, "no-gain", loss_before, loss_before
    return adapted.cpu(), steps, stopped, loss_before, loss_after.item()


def zero_label(
    generator, candidates: dict[str, torch.Tensor], frames: torch.Tensor, config: ZeroLabelConfig
) -> ZeroLabelResult:
    """Candidates (the default first), (N, 3, S, S) normalised unlabelled frames -> the adapter to serve."""
    if len(frames) == 0:
        raise ValueError("zero-label adaptation needs at least one frame")
    if not candidates:
        raise ValueError("zero-label adaptation needs at least one candidate adapter")
    if config.select_margin is None:
        candidates = dict([next(iter(candidates.items()))])  # only the default is ever used: score only it
    losses = candidate_losses(generator, candidates, frames, config.diversity)
    if not all(math.isfinite(loss) for loss in losses.values()):
        raise ValueError("an adapter gives non-finite predictions on these frames")
    source = choose(losses, config.select_margin)
    vector, steps, stopped, before, after = adapt_unlabelled(generator, candidates[source], frames, config)
    return ZeroLabelResult(vector.cpu(), source, losses, steps, stopped, before, after, len(frames))
