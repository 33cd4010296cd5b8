"""The classifier whose LoRA adapters we generate: an open_clip image tower plus a linear head.

Two ways to build the tower:
- `kind="vit"`: a small open_clip `VisionTransformer` trained from scratch (the synthetic world);
- `kind="open_clip"`: a named open_clip model (ViT-B-32, BioCLIP, ...) whose weights come from a
  local file (`open_clip_backbone` resolves the config). Nothing here ever downloads. The config keeps
  the tower's open_clip `vision_cfg`, so a store rebuilds the tower without the original weights file or
  a registered model name: only `pretrain` reads the local checkpoint.

Images go through `preprocess` (Pillow -> normalised tensor) with the mean/std recorded in the config,
so the store, not the caller, decides how pixels are normalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from open_clip.transformer import VisionTransformer
from PIL import Image
from torch import nn

from model_store.store import Store

BACKBONE_FILE = "backbone.safetensors"


@dataclass
class BackboneConfig:
    kind: str = "vit"  # "vit" (from scratch) | "open_clip" (named model, local weights)
    num_classes: int = 7
    image_size: int = 32
    # kind="vit": the tiny tower's shape
    patch_size: int = 8
    width: int = 64
    layers: int = 6
    heads: int = 2
    mlp_ratio: float = 4.0
    embed_dim: int = 64
    # kind="open_clip": model name and local checkpoint (never a hub tag), and the tower's open_clip config
    # (the fields above are copied from it for readers such as the condition encoder)
    model_name: str | None = None
    weights: str | None = None
    vision_cfg: dict | None = None
    quick_gelu: bool = False
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BackboneConfig:
        data = dict(data)
        for key in ("mean", "std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


class Classifier(nn.Module):
    """`tower` (open_clip image tower) -> pooled embedding (B, embed_dim) -> `head` -> logits (B, classes).

    The attribute names `tower` and `head` are part of the adapter format: PEFT keys read
    `base_model.model.tower.transformer.resblocks.{i}.attn...`.
    """

    def __init__(self, tower: VisionTransformer, embed_dim: int, num_classes: int):
        super().__init__()
        self.tower = tower
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(pixels))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.tower.transformer.resblocks


def build_classifier(config: BackboneConfig, pretrained: bool = True) -> Classifier:
    """A classifier with freshly initialised tower weights, or for kind="open_clip" and `pretrained`, the
    weights of the local checkpoint (`pretrained=False`: the architecture only, for loading a store)."""
    if config.kind == "vit":
        tower = VisionTransformer(
            image_size=config.image_size,
            patch_size=config.patch_size,
            width=config.width,
            layers=config.layers,
            heads=config.heads,
            mlp_ratio=config.mlp_ratio,
            output_dim=config.embed_dim,
        )
        return Classifier(tower, config.embed_dim, config.num_classes)
    if config.kind == "open_clip":
        if pretrained:
            tower = load_open_clip_tower(config.model_name, config.weights)
        elif config.vision_cfg is None:
            raise ValueError("an open_clip backbone config without vision_cfg: resolve it with open_clip_backbone")
        else:
            # open_clip's own builder, the one CLIP uses for `model.visual`: same modules, same state-dict keys
            tower = _build_vision_tower(config.embed_dim, config.vision_cfg, config.quick_gelu)
        return Classifier(tower, tower.output_dim, config.num_classes)
    raise ValueError(f"unknown backbone kind {config.kind!r}: expected 'vit' or 'open_clip'")


def open_clip_backbone(
    model: str, weights: str | Path | None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> BackboneConfig:
    """The config of a pretrained open_clip image tower from a local checkpoint.

    `model` is an open_clip model name (ViT-B-32, ViT-B-16, ...) or the path of an open_clip model config
    .json (registered under its file name, e.g. for a custom or BioCLIP-like architecture). `mean`/`std`
    default to OpenAI CLIP's, which open_clip also assumes for a local file; SigLIP, MobileCLIP and other
    families need their own (open_clip's model configs).
    """
    if weights is None or not Path(weights).is_file():
        raise FileNotFoundError(f"open_clip weights file not found: {weights}")
    name = model
    if model.endswith(".json"):
        if not Path(model).is_file():
            raise FileNotFoundError(f"open_clip model config not found: {model}")
        open_clip.add_model_config(model)
        name = Path(model).stem
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip model {name!r} (pass a model name such as ViT-B-32 or a config .json)")
    vision = CLIPVisionCfg(**model_cfg["vision_cfg"])
    if vision.timm_model_name or not isinstance(vision.layers, int):
        raise ValueError(f"{name}: LoRA adapters need a ViT image tower; this model's tower is not one")
    size = vision.image_size
    if not isinstance(size, int):
        if size[0] != size[1]:
            raise ValueError(f"{name}: non-square input {size} is not supported")
        size = size[0]
    return BackboneConfig(
        kind="open_clip",
        image_size=size,
        patch_size=vision.patch_size,
        width=vision.width,
        layers=vision.layers,
        heads=vision.width // vision.head_width,
        mlp_ratio=vision.mlp_ratio,
        embed_dim=model_cfg["embed_dim"],
        model_name=name,
        weights=str(Path(weights).resolve()),
        vision_cfg=dict(model_cfg["vision_cfg"]),
        quick_gelu=bool(model_cfg.get("quick_gelu", False)),
        mean=tuple(mean or OPENAI_DATASET_MEAN),
        std=tuple(std or OPENAI_DATASET_STD),
    )


def load_open_clip_tower(model_name: str | None, weights: str | None) -> VisionTransformer:
    """The image tower of a named open_clip model with weights from a local file (no download)."""
    if not model_name:
        raise ValueError("an open_clip backbone needs a model name (e.g. ViT-B-32)")
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}")
    if weights is None or not Path(weights).is_file():
        raise FileNotFoundError(f"open_clip weights file not found: {weights}")
    # An absolute path can never be mistaken for a pretrained tag (which open_clip would download).
    # The checkpoint is a whole CLIP model (open_clip format); it is loaded strictly, then the text tower dropped.
    model = open_clip.create_model(model_name, pretrained=str(Path(weights).resolve()), device="cpu")
    tower = model.visual
    if not isinstance(tower, VisionTransformer):
        raise ValueError(f"{model_name}: LoRA adapters need a ViT image tower, not {type(tower).__name__}")
    if not all(isinstance(block.attn, nn.MultiheadAttention) for block in tower.transformer.resblocks):
        raise ValueError(f"{model_name}: LoRA adapters need nn.MultiheadAttention blocks; this tower has custom ones")
    return tower


def to_uint8(image: Image.Image, size: int) -> np.ndarray:
    """Any Pillow image -> (3, size, size) uint8 RGB array; the one resize every path shares."""
    rgb = image.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def normalize(pixels: torch.Tensor, config: BackboneConfig) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> float, normalised with the config's mean/std."""
    mean = torch.tensor(config.mean, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def preprocess(images: Sequence[Image.Image], config: BackboneConfig) -> torch.Tensor:
    """Pillow images of any mode and size -> (B, 3, S, S) normalised float tensor."""
    batch = np.stack([to_uint8(image, config.image_size) for image in images])
    return normalize(torch.from_numpy(batch), config)


def load_backbone(store: Store) -> tuple[Classifier, BackboneConfig]:
    """The pretrained classifier of a store (hash-verified), frozen and in eval mode."""
    config = BackboneConfig.from_dict(store.manifest["components"]["backbone"])
    model = build_classifier(config, pretrained=False)  # the store holds every weight
    model.load_state_dict(store.load_tensors(BACKBONE_FILE))
    return model.requires_grad_(False).eval(), config
