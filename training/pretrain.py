"""Stage 1: pretrain the backbone on the `pretrain` locations.

    wildpdiff pretrain --data data/demo --store model_store/demo

Trains the image tower and the linear head (empty class included) from scratch on frames of the
pretrain locations, where every frame is a fresh random scene, then writes `backbone.safetensors`
and the resolved configs into the store. The accuracy on each seen location shows the domain gap
that the per-location LoRA adapters have to close.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from model_store.backbone import BACKBONE_FILE, BackboneConfig, build_classifier, normalize
from model_store.store import Store
from training.common import accuracy, augment, seed_everything
from training.data import CCTDataset


@dataclass
class PretrainConfig:
    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    seed: int = 0


def lr_at(step: int, config: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(
    dataset: CCTDataset, store: Store, backbone_config: BackboneConfig, config: PretrainConfig, progress: bool = True
) -> dict:
    generator = seed_everything(config.seed)
    backbone_config.num_classes = len(dataset.categories)
    model = build_classifier(backbone_config)
    pixels, labels = dataset.load_many(dataset.locations("pretrain"), None, backbone_config.image_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="pretrain", unit="step", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        index = torch.randint(len(labels), (config.batch_size,), generator=generator)
        model.train()
        logits = model(normalize(augment(pixels[index], generator), backbone_config))
        loss = torch.nn.functional.cross_entropy(logits, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start

    seen_val = {
        loc: accuracy(model, *dataset.load(loc, "val", backbone_config.image_size), backbone_config)
        for loc in dataset.locations("seen")
    }
    metrics = {
        "train_accuracy": accuracy(model, pixels[:2000], labels[:2000], backbone_config),
        "seen_val_accuracy": seen_val,
        "seen_val_mean": sum(seen_val.values()) / len(seen_val),
        "seconds": seconds,
        "train_frames": len(labels),
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    store.save_tensors(BACKBONE_FILE, state)
    store.set_component("backbone", backbone_config.to_dict())
    store.set_component("pretrain", asdict(config))
    store.update(classes=dataset.categories)
    store.save_json("pretrain/metrics.json", metrics)
    return metrics
