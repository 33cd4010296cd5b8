import json
import shutil

import pytest
import torch
from peft import PeftModel
from PIL import Image

from model_store.backbone import load_backbone
from model_store.condition import split_backgrounds
from model_store.generator import GENERATOR_FILES, Generator
from model_store.lora import adapter_bytes, flatten, save_adapter_dir, validate_adapter
from model_store.store import Store, StoreError


@pytest.fixture(scope="module")
def generator(smoke_store):
    return Generator.from_store(Store(smoke_store))


@pytest.fixture(scope="module")
def seen(smoke_world):
    return json.loads((smoke_world / "tasks.json").read_text())["seen"]


def background(smoke_world, location, half=1, index=0) -> Image.Image:
    paths = split_backgrounds(sorted((smoke_world / "backgrounds" / location).glob("*.png")))[half]
    return Image.open(paths[index]).convert("RGB")


def test_loads_with_the_public_attributes(generator, smoke_store):
    manifest = json.loads((smoke_store / "manifest.json").read_text())
    assert generator.classes == manifest["classes"]
    assert generator.base_model_hash == manifest["files"]["backbone.safetensors"]["sha256"]
    assert len(generator.store_id) == 16 and int(generator.store_id, 16) >= 0
    assert generator.layout.blocks == 6
    assert sum(torch.Size(s).numel() for s in generator.shapes.values()) == 4608


def test_same_seed_same_bytes_different_seeds_differ(generator, smoke_world, seen):
    image = background(smoke_world, seen[0])
    first, second = generator.generate([image], seeds=7, steps=10), generator.generate([image], seeds=7, steps=10)
    assert adapter_bytes(first[0], {"seed": "7"}) == adapter_bytes(second[0], {"seed": "7"})
    other = generator.generate([image], seeds=8, steps=10)[0]
    assert not torch.equal(flatten(first[0], generator.shapes), flatten(other, generator.shapes))


def test_a_batch_gives_one_valid_adapter_per_image(generator, smoke_world, seen):
    images = [background(smoke_world, location) for location in seen[:3]]
    adapters = generator.generate(images, seeds=[0, 1, 2], steps=5)
    assert len(adapters) == 3
    for adapter in adapters:
        validate_adapter(adapter, generator.shapes)
        assert list(adapter) == list(generator.shapes)
    vectors = generator.generate_vectors(generator.embed(images), seeds=[0, 1, 2], steps=5)
    assert vectors.shape == (3, 4608)
    assert torch.allclose(vectors[1], flatten(adapters[1], generator.shapes), atol=1e-5)


def test_bad_arguments_are_refused(generator):
    features = torch.zeros(2, generator.encoder.dim)
    with pytest.raises(ValueError, match="seeds"):
        generator.generate_vectors(features, seeds=[0], steps=5)
    with pytest.raises(ValueError, match="steps"):
        generator.generate_vectors(features, seeds=[0, 1], steps=0)


def test_distance_and_nearest_location(generator, smoke_world, seen):
    training_frame = background(smoke_world, seen[2], half=0)
    fresh_frame = background(smoke_world, seen[2], half=1)
    odd = Image.new("RGB", (32, 32), (255, 0, 255))
    features = generator.embed([training_frame, fresh_frame, odd])
    distance = generator.distance(features)
    assert distance.shape == (3,)
    assert distance[0] < 1e-3  # a stored frame is its own nearest neighbour
    assert distance[2] > 3 * max(distance[1].item(), 1.0)  # a flat magenta frame is nothing like a location
    assert generator.nearest_location(features[:1]) == [seen[2]]


def test_generated_adapter_loads_with_peft(generator, smoke_store, smoke_world, seen, tmp_path):
    [state] = generator.generate([background(smoke_world, seen[1])], seeds=3, steps=5)
    save_adapter_dir(tmp_path, state, generator.layout, "wildpdiff:test", generator.metadata(3, 5, 0.5))
    backbone, _ = load_backbone(Store(smoke_store))
    model = PeftModel.from_pretrained(backbone, tmp_path)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(state)
    for key, tensor in state.items():
        assert torch.equal(loaded[key.replace(".weight", ".default.weight")], tensor)


@pytest.mark.parametrize("relpath", GENERATOR_FILES)
def test_a_flipped_byte_in_a_generator_file_is_refused(smoke_store, tmp_path, relpath):
    root = tmp_path / "store"
    shutil.copytree(smoke_store, root)
    data = bytearray((root / relpath).read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / relpath).write_bytes(bytes(data))
    with pytest.raises(StoreError, match="sha256"):
        Generator.from_store(Store(root))


def test_a_store_without_a_generator_is_refused(smoke_zoo_store):
    with pytest.raises(StoreError, match="wildpdiff fit"):
        Generator.from_store(Store(smoke_zoo_store))


def test_several_frames_become_one_condition(generator, smoke_world, seen):
    frames = [background(smoke_world, seen[1], index=i) for i in range(2)]
    frames.append(Image.new("RGB", (32, 32), (255, 0, 255)))  # nothing like a location: far from every frame
    features = generator.embed(frames)
    distances = generator.distance(features)

    closest, distance = generator.condition(features, "closest")
    best = int(distances.argmin())
    assert torch.equal(closest, features[best : best + 1]) and distance == pytest.approx(float(distances[best]))
    assert best != 2

    mean, distance = generator.condition(features, "mean")
    assert torch.allclose(mean, features.mean(0, keepdim=True))
    assert distance == pytest.approx(float(distances.min()))  # in distribution when one of the frames is

    one, distance = generator.condition(features[:1])  # one frame: itself, whatever the rule
    assert torch.equal(one, features[:1]) and distance == pytest.approx(float(distances[0]))


def test_bad_frame_combinations_are_refused(generator):
    with pytest.raises(ValueError, match="unknown frame rule"):
        generator.condition(torch.zeros(2, generator.encoder.dim), "median")
    with pytest.raises(ValueError, match="no background frame"):
        generator.condition(torch.zeros(0, generator.encoder.dim))
