"""OOD calibration and fallback adapters (model_store/ood.py), few-shot selection (model_store/adapt.py)."""

import json

import pytest
import torch

from model_store.adapt import FewShotConfig, adapt, labels_to_indices
from model_store.backbone import preprocess
from model_store.generator import Generator
from model_store.ood import FALLBACK_FILE, calibrate_threshold, load_fallback, location_means
from model_store.store import Store
from tests.model_store.test_generator import background


@pytest.fixture(scope="module")
def generator(smoke_store):
    return Generator.from_store(Store(smoke_store))


def test_threshold_is_the_95th_percentile_of_held_out_distances():
    assert calibrate_threshold(torch.arange(101.0)) == pytest.approx(95.0)
    with pytest.raises(ValueError, match="no held-out"):
        calibrate_threshold(torch.zeros(0))


def test_location_means():
    vectors = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 10.0]])
    assert torch.equal(location_means(vectors, torch.tensor([0, 0, 1]), 2), torch.tensor([[2.0, 3.0], [10.0, 10.0]]))
    with pytest.raises(ValueError, match="no checkpoints"):
        location_means(vectors, torch.tensor([0, 0, 0]), 2)


def test_fit_stores_threshold_and_fallback(smoke_store, generator):
    store = Store(smoke_store)
    condition = store.manifest["components"]["condition"]
    assert condition["ood_threshold"] > 0 and "quantile 0.95" in condition["ood_rule"]
    assert store.has(FALLBACK_FILE)
    assert load_fallback(store).shape == (
        len(generator.locations),
        sum(v.numel() for v in map(torch.Size, generator.shapes.values())),
    )


def test_ood_score_on_embeddings_with_known_answers(smoke_store, generator):
    threshold = Store(smoke_store).manifest["components"]["condition"]["ood_threshold"]
    stored = generator.references[:4]
    assert torch.allclose(generator.distance(stored), torch.zeros(4), atol=1e-4)  # the training frames themselves
    # far outside: 50 standard deviations of every feature away from a stored frame
    far = stored + 50 * generator.condition_std
    assert (generator.distance(far) > threshold).all()


def test_labels_must_match_files_and_classes():
    classes = ["empty", "deer", "fox"]
    assert labels_to_indices(["fox", "empty"], classes, 2).tolist() == [2, 0]
    with pytest.raises(ValueError, match="2 shot files but 1 labels"):
        labels_to_indices(["fox"], classes, 2)
    with pytest.raises(ValueError, match="unknown labels \\['wolf'\\]"):
        labels_to_indices(["fox", "wolf"], classes, 2)


def test_adapt_chooses_the_best_candidate_on_the_shots(smoke_world, smoke_store, generator):
    location = json.loads((smoke_world / "tasks.json").read_text())["seen"][0]
    features = generator.embed([background(smoke_world, location)])
    pixels = preprocess([background(smoke_world, location, index=i) for i in range(2)], generator.backbone_config)
    labels = torch.zeros(2, dtype=torch.long)  # empty frames
    fallback = load_fallback(Store(smoke_store))
    result = adapt(generator, features, pixels, labels, steps=5, fallback=fallback, config=FewShotConfig(candidates=3))
    assert result.candidates == 3 + 2  # generated + nearest + base
    assert result.source.split(":")[0] in {"generated", "nearest", "base"}
    refined = adapt(
        generator, features, pixels, labels, steps=5, fallback=fallback, config=FewShotConfig(3, refine_steps=2)
    )
    assert not torch.equal(refined.vector, result.vector)
    assert all(p.grad is None for p in generator.classifier.parameters())  # the shared model collects nothing
