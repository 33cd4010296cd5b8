import numpy as np
import pytest
import torch
from PIL import Image

from model_store.backbone import BackboneConfig, build_classifier
from model_store.condition import (
    ConditionConfig,
    ConditionEncoder,
    is_night,
    location_identification,
    split_backgrounds,
)

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
    encoder = ConditionEncoder(classifier, BACKBONE, config)
    features = encoder.embed([noise_image(1), noise_image(2).convert("L"), noise_image(3).resize((40, 30))])
    assert features.shape == (3, dim) == (3, encoder.dim)
    assert not features.requires_grad


def test_block_features_are_the_pooled_tokens_after_that_block(classifier):
    encoder = ConditionEncoder(classifier, BACKBONE, ConditionConfig(features="block", block=1))
    pixels = torch.randn(2, 3, 16, 16)
    tower = classifier.tower
    x = tower._embeds(pixels)
    for block in classifier.blocks[:2]:
        x = block(x)
    assert torch.allclose(encoder(pixels), x[:, 1:].mean(1), atol=1e-5)  # class token excluded


@pytest.mark.parametrize(
    "config",
    [ConditionConfig(source="clip"), ConditionConfig(features="cls"), ConditionConfig(features="block", block=4)],
)
def test_bad_configs_are_refused(classifier, config):
    with pytest.raises(ValueError):
        ConditionEncoder(classifier, BACKBONE, config)


def test_location_identification_is_nearest_neighbour():
    references = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    locations = torch.tensor([0, 0, 1, 1])
    queries = torch.tensor([[1.0, 0.5], [9.0, 0.5], [9.0, 0.2]])
    correct = location_identification(references, locations, queries, torch.tensor([0, 1, 0]))
    assert correct.tolist() == [True, True, False]
