"""Frames -> class scores with one adapter (or none): the one classification path of the service's /classify
and `wildpdiff classify`.

    probs = class_probabilities(generator, pixels, state)         # (B, classes) float32 on CPU
    top = top_labels(probs, generator.classes, k=3)                # per frame: [(label, score), ...] best first

Frames go through the classifier in blocks of exactly `CLASSIFY_BLOCK` (the last one padded), so a frame's
scores never depend on which other frames shared its call: the service batches frames of concurrent requests
together, and the same request must still give the same bytes. On demo a block of 16 frames costs 5.4 ms
against 2.7 ms for a lone frame (1 thread), and 16 is what a camera-trap burst sends per request anyway.
"""

from __future__ import annotations

import torch

from model_store.generator import Generator
from model_store.lora import adapted_classifier

CLASSIFY_BLOCK = 16


class NonFiniteScores(ValueError):
    """The adapter's weights, each within the limits, together make the classifier's scores overflow."""


@torch.inference_mode()
def class_probabilities(
    generator: Generator, pixels: torch.Tensor, state: dict[str, torch.Tensor] | None
) -> torch.Tensor:
    """(B, 3, S, S) normalised frames -> (B, classes) softmax probabilities on CPU (state None: the base model).

    Raises `NonFiniteScores` rather than return NaN or infinity."""
    g = generator
    classifier = g.classifier  # with the adapter: its weights merged once for every block
    if state is not None:
        classifier = adapted_classifier(g.classifier, {k: v.to(g.device) for k, v in state.items()}, g.layout)
    out = []
    for start in range(0, len(pixels), CLASSIFY_BLOCK):
        block = pixels[start : start + CLASSIFY_BLOCK].to(g.device)
        rows = len(block)
        if rows < CLASSIFY_BLOCK:  # pad with zero frames: fixed shape, fixed arithmetic
            block = torch.cat([block, block.new_zeros(CLASSIFY_BLOCK - rows, *block.shape[1:])])
        logits = classifier(block)
        out.append(logits[:rows].float().softmax(dim=-1).cpu())
    probs = torch.cat(out) if out else torch.zeros(0, len(g.classes))
    if not torch.isfinite(probs).all():
        raise NonFiniteScores("the adapter makes the classifier's scores overflow (NaN or infinite)")
    return probs


def top_labels(probs: torch.Tensor, classes: list[str], k: int) -> list[list[tuple[str, float]]]:
    """(B, classes) probabilities -> per frame the `k` most probable (label, score), best first."""
    scores, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [
        [(classes[i], s) for i, s in zip(row_indices, row_scores, strict=True)]
        for row_scores, row_indices in zip(scores.tolist(), indices.tolist(), strict=True)
    ]
