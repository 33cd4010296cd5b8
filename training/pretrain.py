"""Stage 1: pretrain the backbone on the `pretrain` locations.

    wildpdiff pretrain --data data/demo --store model_store/demo

Trains the image tower and the linear head (empty class included) from scratch on frames of the
pretrain locations, where every frame is a fresh random scene, then writes `backbone.safetensors`
and the resolved configs into the store. The accuracy on each seen location shows the domain gap
that the per-location LoRA adapters have to close.

With a pretrained open_clip tower (`--backbone MODEL --backbone-weights PATH`) only the head is
trained by default (`tower_lr` None -> frozen): the tower already describes images, and a frozen tower
runs once per frame (features are cached, on CUDA when available) instead of once per step. A
positive `tower_lr` fine-tunes the tower too, at that learning rate (small, e.g. 1e-5; a GPU job).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import torch
from tqdm import tqdm

from model_store.backbone import BACKBONE_FILE, BackboneConfig, Classifier, build_classifier, normalize
from model_store.store import Store
from training.common import accuracy, augment, seed_everything
from training.data import CCTDataset, DataError


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    seed: int = 0
    tower_lr: float | None = None  # None: `lr` for a tower trained from scratch, 0 (frozen) for a pretrained one


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
    backbone_config = replace(backbone_config, num_classes=len(dataset.categories))
    model = build_classifier(backbone_config)
    tower_lr = config.tower_lr if config.tower_lr is not None else (config.lr if backbone_config.kind == "vit" else 0.0)
    locations = dataset.locations("pretrain")
    if tower_lr == 0:
        model.tower.requires_grad_(False)
        inputs, labels = tower_features(model, dataset, locations, backbone_config)
        groups = [{"params": model.head.parameters(), "scale": 1.0}]

        def forward(index: torch.Tensor) -> torch.Tensor:
            return model.head(inputs[index])
    else:
        pixels, labels = dataset.load_many(locations, None, backbone_config.image_size)
        groups = [
            {"params": model.head.parameters(), "scale": 1.0},
            {"params": model.tower.parameters(), "scale": tower_lr / config.lr},
        ]

        def forward(index: torch.Tensor) -> torch.Tensor:
            model.train()
            return model(normalize(augment(pixels[index], generator), backbone_config))

    if len(labels) == 0:
        raise DataError(f"the pretrain locations {locations} have no readable frames")
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)

    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="pretrain", unit="step", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config) * group["scale"]
        index = torch.randint(len(labels), (config.batch_size,), generator=generator)
        loss = torch.nn.functional.cross_entropy(forward(index), labels[index])
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
    if tower_lr == 0:
        with torch.no_grad():
            train_accuracy = (model.head(inputs[:2000]).argmax(-1) == labels[:2000]).float().mean().item()
    else:
        train_accuracy = accuracy(model, pixels[:2000], labels[:2000], backbone_config)
    metrics = {
        "train_accuracy": train_accuracy,
        "seen_val_accuracy": seen_val,
        "seen_val_mean": sum(seen_val.values()) / len(seen_val),
        "seconds": seconds,
        "train_frames": len(labels),
        "tower_lr": tower_lr,
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    store.save_tensors(BACKBONE_FILE, state)
    store.set_component("backbone", backbone_config.to_dict())
    store.set_component("pretrain", asdict(config))
    store.update(classes=dataset.categories)
    store.save_json("pretrain/metrics.json", metrics)
    return metrics


@torch.no_grad()
def tower_features(
    model: Classifier, dataset: CCTDataset, locations: list[str], config: BackboneConfig, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen-tower embeddings (N, D) and labels (N,) of the frames of `locations`, one location in memory at once."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tower = model.tower.to(device).eval()
    features, labels = [], []
    for location in locations:
        pixels, location_labels = dataset.load(location, None, config.image_size)
        for i in range(0, len(pixels), batch_size):
            features.append(tower(normalize(pixels[i : i + batch_size].to(device), config)).float().cpu())
        labels.append(location_labels)
    model.tower.to("cpu")
    return torch.cat(features) if features else torch.zeros(0, model.head.in_features), torch.cat(labels)
