"""LoRA adapters of the classifier: layout, adapter <-> flat vector, PEFT export, our own way to apply one.

The adapter format is PEFT's: LoRA on the attention of the first `blocks` transformer blocks. PEFT wraps
open_clip's `nn.MultiheadAttention` and puts one LoRA pair on the fused q/k/v projection `in_proj_weight`
and one on `out_proj.weight`, so per block of width w and rank r an adapter holds

    attn.base_layer.out_proj.lora_A (r, w)   attn.base_layer.out_proj.lora_B (w, r)
    attn.lora_A                     (r, w)   attn.lora_B                     (3w, r)

and the adapted weights are W + (alpha / r) * B @ A (Hu et al., 2021).

PEFT's MultiheadAttention applies an adapter by merging it into the shared module's weights before each
forward and unmerging after, so two threads sharing one model would mix adapters. Worse, up to at least
peft 0.21 that merge adds the out_proj delta twice (huggingface/peft PR #3774), so a PeftModel computes
with W + 2 * scale * B @ A on out_proj. We therefore never run PEFT's forward: `adapted_logits` computes
the merged weights as new tensors and runs the classifier through `torch.func.functional_call`, for
serving and for training alike (`init_adapter` gives PEFT's initialisation). PEFT defines the format.

`functional_call` swaps the merged tensors into the module for the duration of the call, so it leaves the
classifier's own weights untouched afterwards but is NOT safe for two threads sharing one classifier:
callers serialise model work (the service runs it on a single inference thread).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import peft
import safetensors
import safetensors.torch
import torch
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from torch.func import functional_call

from model_store.backbone import Classifier
from model_store.store import atomic_write_bytes, safetensors_bytes

PREFIX = "base_model.model."  # what PeftModel puts in front of the classifier's module names
# What an adapter file may hold: float32, as the store and `wildpdiff generate` write, with weights no larger
# than MAX_ADAPTER_ABS. Zoo checkpoints stay below 1; 100 keeps the logits of the adapted classifier finite.
ADAPTER_DTYPES = ("F32",)
MAX_ADAPTER_ABS = 100.0


@dataclass
class LoraLayout:
    rank: int = 2
    alpha: float = 4.0
    blocks: int = 6  # LoRA on the attention of the first `blocks` transformer blocks (as in p-diff)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LoraLayout:
        return cls(**data)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def peft_config(self) -> peft.LoraConfig:
        # A regex string is matched against full module names, so only the `attn` modules themselves match.
        indices = "|".join(str(i) for i in range(self.blocks))
        return peft.LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=rf".*resblocks\.({indices})\.attn",
            lora_dropout=0.0,
            bias="none",
        )


def _check_blocks(classifier: Classifier, layout: LoraLayout) -> None:
    if not 1 <= layout.blocks <= len(classifier.blocks):
        raise ValueError(f"LoRA on {layout.blocks} blocks, but the classifier has {len(classifier.blocks)}")


def _targets(layout: LoraLayout) -> list[tuple[str, str, str]]:
    """(classifier weight, PEFT lora_A key, PEFT lora_B key) per adapted weight, in PEFT's key order."""
    targets = []
    for i in range(layout.blocks):
        attn = f"tower.transformer.resblocks.{i}.attn"
        in_proj = f"{PREFIX}{attn}"
        out_proj = f"{PREFIX}{attn}.base_layer.out_proj"  # PEFT wraps out_proj inside the wrapped attn
        targets.append((f"{attn}.out_proj.weight", f"{out_proj}.lora_A.weight", f"{out_proj}.lora_B.weight"))
        targets.append((f"{attn}.in_proj_weight", f"{in_proj}.lora_A.weight", f"{in_proj}.lora_B.weight"))
    return targets


def adapter_shapes(classifier: Classifier, layout: LoraLayout) -> dict[str, tuple[int, ...]]:
    """PEFT state-dict keys -> shapes, ordered by block then key; read off the base weights."""
    _check_blocks(classifier, layout)
    params = dict(classifier.named_parameters())
    shapes = {}
    for weight, key_a, key_b in _targets(layout):
        out_features, in_features = params[weight].shape
        shapes[key_a] = (layout.rank, in_features)
        shapes[key_b] = (out_features, layout.rank)
    return shapes


def attach_lora(classifier: Classifier, layout: LoraLayout) -> peft.PeftModel:
    """Wrap `classifier` IN PLACE with fresh LoRA layers (PEFT init: A random, B zero).

    PEFT freezes every other parameter, the head included. Mind the out_proj bug in PEFT's forward (module
    docstring): to train, prefer `init_adapter` + `adapted_logits`.
    """
    _check_blocks(classifier, layout)
    return peft.get_peft_model(classifier, layout.peft_config())


def init_adapter(
    classifier: Classifier, layout: LoraLayout, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """A fresh trainable adapter on the classifier's device, initialised as PEFT does:
    A like nn.Linear (kaiming uniform), B zero, so training starts from the base model."""
    device = next(classifier.parameters()).device
    state = {}
    for key, shape in adapter_shapes(classifier, layout).items():
        tensor = torch.zeros(shape)  # on CPU, where a CPU generator can fill it
        if ".lora_A." in key:
            torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
        state[key] = tensor.to(device).requires_grad_()
    return state


# -----------------------------------------------------------------------------
# adapter <-> flat parameter vector


def _check_keys_and_shapes(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    if missing:
        raise ValueError(f"adapter is missing {len(missing)} tensor(s), first: {missing[0]!r}")
    if unexpected:
        raise ValueError(f"adapter has {len(unexpected)} unexpected tensor(s), first: {unexpected[0]!r}")
    for key, shape in shapes.items():
        if tuple(state[key].shape) != tuple(shape):
            raise ValueError(f"{key!r}: shape {tuple(state[key].shape)}, expected {tuple(shape)}")


def validate_adapter(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse (ValueError) an adapter whose keys, shapes, dtypes or values do not fit the layout: float32 only
    (what the store and `wildpdiff generate` write), finite, and |w| <= `MAX_ADAPTER_ABS`."""
    _check_keys_and_shapes(state, shapes)
    for key, tensor in state.items():
        if tensor.dtype != torch.float32:
            raise ValueError(f"{key!r}: dtype {tensor.dtype}, expected float32")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{key!r}: contains NaN or infinite values")
        if tensor.numel() and (largest := tensor.abs().max().item()) > MAX_ADAPTER_ABS:
            raise ValueError(f"{key!r}: a weight of magnitude {largest:.3g}, above the limit of {MAX_ADAPTER_ABS:g}")


def flatten(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> torch.Tensor:
    """Adapter -> (P,) vector, concatenated in `shapes` order."""
    _check_keys_and_shapes(state, shapes)
    return torch.cat([state[key].reshape(-1) for key in shapes])


def unflatten(vector: torch.Tensor, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """(P,) -> adapter, or (B, P) -> adapter whose tensors have a leading B dim."""
    sizes = [torch.Size(shape).numel() for shape in shapes.values()]
    if vector.dim() not in (1, 2) or vector.shape[-1] != sum(sizes):
        raise ValueError(f"expected a (P,) or (B, P) vector with P={sum(sizes)}, got {tuple(vector.shape)}")
    lead = vector.shape[:-1]  # () or (B,)
    chunks = vector.split(sizes, dim=-1)
    return {key: chunk.reshape(*lead, *shapes[key]) for key, chunk in zip(shapes, chunks, strict=True)}


# -----------------------------------------------------------------------------
# serialisation: a standard PEFT adapter folder, or safetensors bytes over HTTP


def save_adapter_dir(
    out_dir: str | Path,
    state: dict[str, torch.Tensor],
    layout: LoraLayout,
    base_model_name: str,
    metadata: dict[str, str],
) -> None:
    """Write `adapter_config.json` + `adapter_model.safetensors`, loadable by `PeftModel.from_pretrained`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = layout.peft_config()
    config.base_model_name_or_path = base_model_name
    # PEFT's own serialiser writes in place; write into a temp folder beside and move, to stay atomic.
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        config.save_pretrained(tmp)
        Path(tmp, CONFIG_NAME).replace(out_dir / CONFIG_NAME)
    atomic_write_bytes(out_dir / SAFETENSORS_WEIGHTS_NAME, adapter_bytes(state, metadata))


def adapter_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """An adapter as safetensors bytes; equal inputs give equal bytes (usable as an ETag)."""
    return safetensors_bytes(state, {"format": "pt", **metadata})


def adapter_header(data: bytes) -> dict:
    """The JSON header of safetensors bytes, checked before the loader sees them: every tensor an entry with a
    dtype in `ADAPTER_DTYPES` (the loader itself raises KeyError on dtypes it does not know, and torch has no
    kernels for float8 or packed float4). ValueError naming the tensor otherwise."""
    if len(data) < 8 or (n := int.from_bytes(data[:8], "little")) > len(data) - 8:
        raise ValueError("not a valid safetensors adapter: header length beyond the end of the file")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not a valid safetensors adapter: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("not a valid safetensors adapter: header is not a JSON object")
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in ADAPTER_DTYPES:
            raise ValueError(f"{key!r}: dtype {dtype!r}, expected one of {', '.join(ADAPTER_DTYPES)}")
    return header


def load_adapter_bytes(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Parse safetensors bytes (never pickle) of float32 tensors -> (state, metadata); anything else is a
    ValueError."""
    header = adapter_header(data)
    try:
        state = safetensors.torch.load(data)
    except Exception as e:  # any failure inside the loader is the file's fault, not ours
        raise ValueError(f"not a valid safetensors adapter: {e}") from None
    return state, header.get("__metadata__", {})


# -----------------------------------------------------------------------------
# applying an adapter without touching the shared classifier


def merged_weights(
    classifier: Classifier, state: dict[str, torch.Tensor], layout: LoraLayout
) -> dict[str, torch.Tensor]:
    """The classifier's parameters with W + scale * B @ A in place of each adapted weight (new tensors)."""
    weights = dict(classifier.named_parameters())
    for name, key_a, key_b in _targets(layout):
        w = weights[name]
        weights[name] = w + layout.scale * (state[key_b].to(w) @ state[key_a].to(w))
    return weights


def adapted_classifier(
    classifier: Classifier, state: dict[str, torch.Tensor], layout: LoraLayout
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The classifier with the adapter applied, weights merged once for any number of calls: pixels -> logits
    (B, classes). The module's weights are restored after each call. Not thread-safe on a shared classifier
    (module docstring)."""
    weights = merged_weights(classifier, state, layout)
    return lambda pixels: functional_call(classifier, weights, (pixels,))


def adapted_logits(
    classifier: Classifier, state: dict[str, torch.Tensor], layout: LoraLayout, pixels: torch.Tensor
) -> torch.Tensor:
    """Logits (B, classes) of the classifier with the adapter applied (`adapted_classifier`, for one call)."""
    return adapted_classifier(classifier, state, layout)(pixels)


@torch.no_grad()
def adapter_predictions(
    classifier: Classifier,
    state: dict[str, torch.Tensor] | None,
    layout: LoraLayout,
    pixels: torch.Tensor,
    batch_size: int = 512,
) -> torch.Tensor:
    """(N, 3, S, S) normalised frames -> (N,) predicted class indices with the adapter applied (None: the base
    model). The one way every stage scores an adapter: zoo records, evaluation, few-shot selection, bench."""
    out = []
    for i in range(0, len(pixels), batch_size):
        batch = pixels[i : i + batch_size]
        logits = classifier(batch) if state is None else adapted_logits(classifier, state, layout, batch)
        out.append(logits.argmax(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def adapter_accuracy(
    classifier: Classifier,
    state: dict[str, torch.Tensor] | None,
    layout: LoraLayout,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 512,
) -> float:
    """Fraction of frames the adapted classifier labels right (NaN for no frames)."""
    if len(labels) == 0:
        return float("nan")
    predictions = adapter_predictions(classifier, state, layout, pixels, batch_size)
    return (predictions == labels.cpu()).float().mean().item()
