import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from model_store.backbone import BackboneConfig, build_classifier, open_clip_backbone
from model_store.condition import (
    ConditionConfig,
    ConditionEncoder,
    is_night,
    location_identification,
    split_backgrounds,
)
from tests.training.real_data import save_tiny_open_clip

BACKBONE = BackboneConfig(width=32, layers=4, heads=2, image_size=16, patch_size=8, embed_dim=24)


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return build_classifier(BACKBONE).eval()


def noise_image(seed: int, grey: bool = False) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 20, 1 if grey else 3), dtype=np.uint8)
    return Image.fromarray(np.repeat(pixels, 3, axis=-1) if grey else pixels)


def test_split_is_even_positions_for_training_odd_for_fresh():
    train, fresh = split_backgrounds([f"{k:03d}.png" for k in range(5)])
    assert train == ["000.png", "002.png", "004.png"]
    assert fresh == ["001.png", "003.png"]


def test_night_infrared_frames_are_the_greyscale_ones():
    assert is_night(noise_image(0, grey=True))
    assert is_night(noise_image(0, grey=True).convert("L"))
    assert not is_night(noise_image(0))


@pytest.mark.parametrize(
    ("config", "dim"),
    [(ConditionConfig(features="block", block=0), 32), (ConditionConfig(features="block", block=3), 32),
     (ConditionConfig(features="final"), 24)],
)  # fmt: skip
def test_features_have_the_documented_width(classifier, config, dim):
    encoder = ConditionEncoder(classifier.tower, BACKBONE, config)
    features = encoder.embed([noise_image(1), noise_image(2).convert("L"), noise_image(3).resize((40, 30))])
    assert features.shape == (3, dim) == (3, encoder.dim)
    assert not features.requires_grad


def test_block_features_are_the_pooled_tokens_after_that_block(classifier):
    encoder = ConditionEncoder(classifier.tower, BACKBONE, ConditionConfig(features="block", block=1))
    pixels = torch.randn(2, 3, 16, 16)
    tower = classifier.tower
    x = tower._embeds(pixels)
    for block in classifier.blocks[:2]:
        x = block(x)
    assert torch.allclose(encoder(pixels), x[:, 1:].mean(1), atol=1e-5)  # class token excluded


@pytest.mark.parametrize(
    "config",
    [ConditionConfig(source="clip"), ConditionConfig(source="open_clip"), ConditionConfig(features="cls"),
     ConditionConfig(features="block", block=4)],
)  # fmt: skip
def test_bad_configs_are_refused(classifier, config):
    with pytest.raises(ValueError):
        ConditionEncoder.build(classifier, BACKBONE, config)


def test_an_open_clip_condition_tower_loads_from_a_local_file(classifier, tmp_path):
    config_file, weights = save_tiny_open_clip(tmp_path)
    tower = open_clip_backbone(str(config_file), weights, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))
    config = ConditionConfig(source="open_clip", tower=tower.to_dict())
    encoder = ConditionEncoder.build(classifier, BACKBONE, config)
    saved = load_file(weights)
    assert all(torch.equal(v, saved[f"visual.{k}"]) for k, v in encoder.tower.state_dict().items())
    assert encoder.tower is not classifier.tower
    assert encoder.backbone_config.mean == (0.4, 0.4, 0.4)  # its own input normalisation, not the backbone's
    # a store's copy of the tower (no weights file needed) gives the same features
    weights.unlink()
    copy = ConditionEncoder.build(classifier, BACKBONE, config, tower_state=encoder.tower.state_dict())
    images = [noise_image(1), noise_image(2).resize((48, 40))]
    assert torch.equal(copy.embed(images), encoder.embed(images))
    assert encoder.embed(images).shape == (2, 64)
    with pytest.raises(FileNotFoundError, match="open_clip weights file not found"):
        ConditionEncoder.build(classifier, BACKBONE, config)


def test_location_identification_is_nearest_neighbour():
    references = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    locations = torch.tensor([0, 0, 1, 1])
    queries = torch.tensor([[1.0, 0.5], [9.0, 0.5], [9.0, 0.2]])
    correct = location_identification(references, locations, queries, torch.tensor([0, 1, 0]))
    assert correct.tolist() == [True, True, False]
