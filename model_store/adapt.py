"""Few-shot adaptation: a background frame plus a few labelled frames of the location -> one adapter.

    result = adapt(generator, features, pixels, labels, seed=0, steps=10, config=FewShotConfig())

One background frame is a weak task representation, worst at locations unlike any seen one (RQ3). A few
labelled frames ("shots") settle what the frame cannot:
1. candidates: `config.candidates` generated adapters (seeds seed, seed+1, ...) in ONE batched call, plus
   the two retrieved ones a generator can be wrong against: the nearest seen location's mean zoo adapter
   (when the store has them, `model_store.ood`) and a base adapter (B = 0, A initialised as PEFT does: the
   pretrained backbone, but one that refinement can move, unlike an all-zero one whose gradients are zero);
2. choose the best by accuracy on the shots, ties broken by the mean log-likelihood of the true labels;
3. optionally `config.refine_steps` AdamW steps on the chosen adapter's cross-entropy over the shots,
   through `adapted_logits` (0 by default: with a handful of frames, fine-tuning mostly memorises them).
Only the shots are ever scored: evaluation frames never reach this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_store.generator import DEFAULT_STEPS
from model_store.lora import adapted_logits, flatten, init_adapter, unflatten


@dataclass(frozen=True)
class FewShotConfig:
    candidates: int = 16  # generated adapters to choose from (plus nearest and base)
    refine_steps: int = 0  # gradient steps on the chosen adapter
    lr: float = 1e-2  # the zoo's fine-tuning learning rate

    def __post_init__(self):
        if self.candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {self.candidates}")
        if self.refine_steps < 0:
            raise ValueError(f"refine_steps must be >= 0, got {self.refine_steps}")


@dataclass
class FewShotResult:
    vector: torch.Tensor  # (P,) the chosen (and refined) adapter, flat
    source: str  # "generated:<seed>" | "nearest:<location>" | "base"
    shot_acc: float  # of the chosen candidate before refinement
    shot_loglik: float
    candidates: int  # how many were scored

    def metadata(self) -> dict[str, str]:
        return {
            "fewshot_source": self.source,
            "fewshot_shot_acc": f"{self.shot_acc:.6f}",
            "fewshot_shot_loglik": f"{self.shot_loglik:.6f}",
            "fewshot_candidates": str(self.candidates),
        }


def labels_to_indices(labels: list[str], classes: list[str], num_files: int) -> torch.Tensor:
    """Class names (one per shot file) -> (S,) class indices; ValueError saying what is wrong otherwise."""
    if len(labels) != num_files:
        raise ValueError(f"{num_files} shot files but {len(labels)} labels: give one class name per file")
    unknown = sorted({label for label in labels if label not in classes})
    if unknown:
        raise ValueError(f"unknown labels {unknown}; the classes are {classes}")
    return torch.tensor([classes.index(label) for label in labels])


@torch.no_grad()
def score(generator, vectors: torch.Tensor, pixels: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(K, P) adapters on (S, 3, H, W) shots -> accuracy (K,) and mean log-likelihood of the labels (K,)."""
    accs, logliks = [], []
    for vector in vectors:
        state = {k: v.to(pixels.device) for k, v in unflatten(vector, generator.shapes).items()}
        log_probs = adapted_logits(generator.classifier, state, generator.layout, pixels).float().log_softmax(-1)
        accs.append((log_probs.argmax(-1) == labels).float().mean())
        logliks.append(log_probs.gather(1, labels[:, None]).mean())
    return torch.stack(accs).cpu(), torch.stack(logliks).cpu()


def refine(generator, vector: torch.Tensor, pixels: torch.Tensor, labels: torch.Tensor, config: FewShotConfig):
    """`config.refine_steps` AdamW steps on the shots' cross-entropy, the adapter the only trainable thing."""
    vector = vector.clone().to(pixels.device).requires_grad_()
    optimizer = torch.optim.AdamW([vector], lr=config.lr, weight_decay=0.0)
    for _ in range(config.refine_steps):
        logits = adapted_logits(generator.classifier, unflatten(vector, generator.shapes), generator.layout, pixels)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        # autograd.grad, not backward: the shared classifier's own parameters must collect no gradients
        (vector.grad,) = torch.autograd.grad(loss, [vector])
        optimizer.step()
    return vector.detach().cpu()


def adapt(
    generator,
    features: torch.Tensor,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    fallback: torch.Tensor | None = None,
    config: FewShotConfig = FewShotConfig(),
) -> FewShotResult:
    """(1, D) condition features of the background, (S, 3, H, W) normalised shots, (S,) labels -> the adapter.

    `fallback`: the store's (L, P) per-location mean adapters, or None (then only generated + base).
    """
    if len(pixels) == 0 or len(pixels) != len(labels):
        raise ValueError(f"need one label per shot, got {len(pixels)} shots and {len(labels)} labels")
    seeds = [seed + i for i in range(config.candidates)]
    vectors = [generator.generate_vectors(features.expand(len(seeds), -1), seeds, steps)]  # (K, P), one call
    sources = [f"generated:{s}" for s in seeds]
    if fallback is not None:
        [location] = generator.nearest_location(features)
        vectors.append(fallback[generator.locations.index(location)][None])
        sources.append(f"nearest:{location}")
    base = init_adapter(generator.classifier, generator.layout, torch.Generator().manual_seed(seed))
    vectors.append(flatten(base, generator.shapes).detach().cpu()[None])
    sources.append("base")
    candidates = torch.cat(vectors)

    labels = labels.to(pixels.device)
    accs, logliks = score(generator, candidates, pixels, labels)
    best = max(range(len(candidates)), key=lambda i: (accs[i].item(), logliks[i].item()))
    vector = candidates[best]
    if config.refine_steps:
        vector = refine(generator, vector, pixels, labels, config)
    return FewShotResult(vector, sources[best], accs[best].item(), logliks[best].item(), len(candidates))
