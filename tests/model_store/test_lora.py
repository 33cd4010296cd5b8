import copy
import json
import os
import pickle
import re

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open

from model_store.backbone import BackboneConfig, build_classifier
from model_store.lora import (
    LoraLayout,
    adapted_logits,
    adapter_bytes,
    adapter_shapes,
    attach_lora,
    flatten,
    init_adapter,
    load_adapter_bytes,
    merged_weights,
    save_adapter_dir,
    unflatten,
    validate_adapter,
)

WIDTH = 32
CONFIG = BackboneConfig(width=WIDTH, layers=6, heads=2, image_size=16, patch_size=8, embed_dim=16)


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return build_classifier(CONFIG).eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def random_adapter(classifier, layout, seed=0):
    """Non-zero A and B (PEFT initialises B to zero, which would hide a wrong merge)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = adapter_shapes(classifier, layout)
    return {key: 0.1 * torch.randn(shape, generator=generator) for key, shape in shapes.items()}


@pytest.mark.parametrize("rank", [1, 2, 4])
@pytest.mark.parametrize("blocks", [2, 4, 6])
def test_shapes_match_peft(classifier, rank, blocks):
    layout = LoraLayout(rank=rank, alpha=2.0 * rank, blocks=blocks)
    shapes = adapter_shapes(classifier, layout)
    assert type(classifier.blocks[0].attn) is torch.nn.MultiheadAttention  # nothing was attached

    peft_state = get_peft_model_state_dict(attach_lora(copy.deepcopy(classifier), layout))
    assert list(shapes.items()) == [(key, tuple(t.shape)) for key, t in peft_state.items()]
    # per block: in_proj A (r, w) + B (3w, r), out_proj A (r, w) + B (w, r)
    per_block = rank * WIDTH + 3 * WIDTH * rank + rank * WIDTH + WIDTH * rank
    assert sum(torch.Size(s).numel() for s in shapes.values()) == blocks * per_block


def test_attach_lora_trains_only_lora(classifier):
    model = attach_lora(copy.deepcopy(classifier), LoraLayout())
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 24 and all(".lora_" in name for name in trainable)
    assert not model.base_model.model.head.weight.requires_grad


def test_too_many_blocks_is_refused(classifier):
    with pytest.raises(ValueError, match="7 blocks"):
        adapter_shapes(classifier, LoraLayout(blocks=7))


def test_flatten_unflatten_round_trip(classifier):
    layout = LoraLayout()
    shapes = adapter_shapes(classifier, layout)
    state = random_adapter(classifier, layout)
    vector = flatten(state, shapes)
    assert vector.shape == (6 * 6 * WIDTH * layout.rank,)
    restored = unflatten(vector, shapes)
    assert list(restored) == list(shapes) and all(torch.equal(restored[k], state[k]) for k in state)

    batch = unflatten(torch.stack([vector, 2 * vector]), shapes)
    assert all(torch.equal(batch[k][1], 2 * state[k]) for k in state)

    with pytest.raises(ValueError, match="P=2304"):
        unflatten(vector[:-1], shapes)
    key = next(iter(shapes))
    with pytest.raises(ValueError, match=key):
        flatten({**state, key: state[key].T}, shapes)


def peft_model(classifier, state, layout):
    model = attach_lora(copy.deepcopy(classifier), layout).eval()
    set_peft_model_state_dict(model, state)
    return model


def without_out_proj(state):
    return {k: torch.zeros_like(v) if "out_proj.lora_B" in k else v for k, v in state.items()}


def test_delta_weights_match_peft(classifier):
    """Our merge adds, to every adapted weight, exactly the delta PEFT's layers compute for it."""
    layout = LoraLayout(rank=4, alpha=2.0, blocks=3)
    state = random_adapter(classifier, layout)
    model = peft_model(classifier, state, layout)
    base, merged = dict(classifier.named_parameters()), merged_weights(classifier, state, layout)
    for i in range(layout.blocks):
        attn = model.base_model.model.blocks[i].attn  # PEFT's LoRA MultiheadAttention
        name = f"tower.transformer.resblocks.{i}.attn"
        assert torch.allclose(
            merged[f"{name}.in_proj_weight"] - base[f"{name}.in_proj_weight"],
            attn.get_delta_weight("default"),
            atol=1e-6,
        )
        assert torch.allclose(
            merged[f"{name}.out_proj.weight"] - base[f"{name}.out_proj.weight"],
            attn.get_base_layer().out_proj.get_delta_weight("default"),
            atol=1e-6,
        )


def test_adapted_logits_match_peft(classifier, pixels):
    """Reference-library equivalence: our functional merge == PEFT's PeftModel forward.

    PEFT's forward is only right for the in_proj half (see the xfail test below), so that is what is compared
    against PEFT; the full adapter is compared against the same weights loaded into a plain copy.
    """
    layout = LoraLayout()
    state = random_adapter(classifier, layout)
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    plain = copy.deepcopy(classifier)
    plain.load_state_dict(merged_weights(classifier, state, layout), strict=False)
    with torch.no_grad():
        expected = peft_model(classifier, without_out_proj(state), layout)(pixels)
        ours = adapted_logits(classifier, without_out_proj(state), layout, pixels)
        assert torch.allclose(ours, expected, atol=1e-5)
        assert not torch.allclose(ours, classifier(pixels), atol=1e-3)  # the adapter really acts

        assert torch.allclose(adapted_logits(classifier, state, layout, pixels), plain(pixels), atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in classifier.state_dict().items())  # untouched


@pytest.mark.xfail(strict=True, reason="peft MultiheadAttention adds the out_proj delta twice (PR 3774)")
def test_peft_forward_matches_on_out_proj(classifier, pixels):
    layout = LoraLayout()
    state = random_adapter(classifier, layout)
    with torch.no_grad():
        expected = peft_model(classifier, state, layout)(pixels)
        assert torch.allclose(adapted_logits(classifier, state, layout, pixels), expected, atol=1e-5)


def test_peft_adapter_dir_loads_in_peft(classifier, pixels, tmp_path):
    layout = LoraLayout(rank=4, alpha=8.0, blocks=3)
    state = random_adapter(classifier, layout, seed=3)
    save_adapter_dir(tmp_path / "adapter", state, layout, "wild-p-diff/tiny-vit", {"location": "L07"})
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "wild-p-diff/tiny-vit" and config["r"] == 4
    with safe_open(tmp_path / "adapter/adapter_model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "location": "L07"}

    model = PeftModel.from_pretrained(copy.deepcopy(classifier), tmp_path / "adapter").eval()
    loaded = get_peft_model_state_dict(model, save_embedding_layers=False)  # "auto" asks the Hub
    assert list(loaded) == list(state) and all(torch.equal(loaded[k], state[k]) for k in state)

    # logits through PEFT's forward: the in_proj half only (out_proj: see the xfail test above)
    save_adapter_dir(tmp_path / "in_proj", without_out_proj(state), layout, "wild-p-diff/tiny-vit", {})
    model = PeftModel.from_pretrained(copy.deepcopy(classifier), tmp_path / "in_proj").eval()
    with torch.no_grad():
        ours = adapted_logits(classifier, without_out_proj(state), layout, pixels)
        assert torch.allclose(model(pixels), ours, atol=1e-5)


def test_init_adapter_trains_through_adapted_logits(classifier, pixels):
    layout = LoraLayout()
    state = init_adapter(classifier, layout, torch.Generator().manual_seed(0))
    assert list(state) == list(adapter_shapes(classifier, layout))
    for key, tensor in state.items():
        assert tensor.requires_grad
        if ".lora_B." in key:
            assert not tensor.any()  # starts from the base model
        else:
            assert 0 < tensor.abs().max() <= 1 / WIDTH**0.5  # kaiming uniform(a=sqrt 5) = nn.Linear's bound
    with torch.no_grad():
        assert torch.allclose(adapted_logits(classifier, state, layout, pixels), classifier(pixels))

    adapted_logits(classifier, state, layout, pixels).logsumexp(-1).sum().backward()
    assert all(state[k].grad is not None and state[k].grad.any() for k in state if ".lora_B." in k)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda s, k: {j: v for j, v in s.items() if j != k}, "missing .*{key}"),
        (lambda s, k: {**s, "extra.weight": s[k]}, "unexpected .*extra"),
        (lambda s, k: {**s, k: s[k][:1]}, "{key}.*shape"),
        (lambda s, k: {**s, k: s[k].to(torch.int32)}, "{key}.*dtype"),
        (lambda s, k: {**s, k: s[k].to(torch.float64)}, "{key}.*dtype torch.float64, expected float32"),
        (lambda s, k: {**s, k: s[k].to(torch.float16)}, "{key}.*dtype torch.float16, expected float32"),
        (lambda s, k: {**s, k: s[k].index_fill(0, torch.tensor([0]), 3e38)}, "{key}.*magnitude 3e\\+38"),
        (lambda s, k: {**s, k: s[k].index_fill(0, torch.tensor([0]), -101.0)}, "{key}.*magnitude 101, above"),
        (lambda s, k: {**s, k: s[k].index_fill(0, torch.tensor([0]), float("nan"))}, "{key}.*NaN"),
        (lambda s, k: {**s, k: s[k].index_fill(0, torch.tensor([0]), float("inf"))}, "{key}.*infinite"),
    ],
)
def test_validate_adapter_refuses(classifier, corrupt, message):
    layout = LoraLayout()
    shapes = adapter_shapes(classifier, layout)
    state = random_adapter(classifier, layout)
    validate_adapter(state, shapes)
    key = list(shapes)[5]
    with pytest.raises(ValueError, match=message.format(key=re.escape(key))):
        validate_adapter(corrupt(state, key), shapes)


def test_adapter_bytes_round_trip_and_deterministic(classifier):
    state = random_adapter(classifier, LoraLayout())
    metadata = {f"key{i}": str(i) for i in range(12)}  # safetensors' own header order is random
    data = adapter_bytes(state, metadata)
    assert all(adapter_bytes(state, dict(reversed(metadata.items()))) == data for _ in range(5))

    loaded, loaded_metadata = load_adapter_bytes(data)
    assert loaded_metadata == {"format": "pt", **metadata}
    assert all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("data", [pickle.dumps({"w": torch.ones(2)}), os.urandom(256), b""])
def test_load_adapter_bytes_refuses_non_safetensors(data):
    with pytest.raises(ValueError, match="not a valid safetensors adapter"):
        load_adapter_bytes(data)


def raw_safetensors(dtype: str, shape: list[int], nbytes: int) -> bytes:
    """A safetensors file with one tensor "w" whose header names `dtype`, whether torch knows it or not."""
    header = json.dumps({"w": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + b"\0" * nbytes


@pytest.mark.parametrize(
    "dtype, nbytes",
    [("F8_E4M3", 8), ("F8_E5M2", 8), ("F8_E8M0", 8), ("F4", 4), ("F16", 16), ("BF16", 16), ("F64", 64),
     ("I32", 32), ("XYZ", 8)],
)  # fmt: skip
def test_load_adapter_bytes_accepts_float32_only(dtype, nbytes):
    with pytest.raises(ValueError, match=f"'w': dtype '{dtype}', expected one of F32"):
        load_adapter_bytes(raw_safetensors(dtype, [2, 4], nbytes))
    state, _ = load_adapter_bytes(raw_safetensors("F32", [2, 4], 32))
    assert state["w"].dtype == torch.float32


@pytest.mark.parametrize(
    "header, message",
    [(b"[1, 2]", "not a JSON object"), (b"{nope", "not JSON"), (b'{"w": 3}', "'w': dtype None"),
     (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 999]}}', "not a valid safetensors")],
)  # fmt: skip
def test_load_adapter_bytes_refuses_broken_headers(header, message):
    header += b" " * (-len(header) % 8)
    with pytest.raises(ValueError, match=message):
        load_adapter_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
