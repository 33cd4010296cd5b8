"""Zero-label choice and adaptation (model_store/zerolabel.py) and their place in `infer`."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from PIL import Image

from model_store.backbone import normalize
from model_store.generator import Generator
from model_store.inference import InferenceOptions, Region, ServingTable, infer
from model_store.store import Store
from model_store.zerolabel import ZeroLabelConfig, adapt_unlabelled, choose, information_loss, zero_label
from training.data import read_cct


@pytest.fixture(scope="module")
def generator(smoke_store):
    return Generator.from_store(Store(smoke_store))


@pytest.fixture(scope="module")
def location_frames(smoke_world, generator):
    """(a held-out background of an unseen location, 32 of its train frames normalised, their labels)."""
    dataset = read_cct(smoke_world)
    location = dataset.locations("unseen")[0]
    pixels, labels = dataset.load(location, "train", generator.backbone_config.image_size)
    background = Image.open(dataset.backgrounds(location)[-1]).convert("RGB")
    return background, normalize(pixels[:32], generator.backbone_config), labels[:32]


def test_information_loss_rewards_confident_and_diverse_predictions():
    classes = 4
    uniform = torch.zeros(8, classes)
    one_class = torch.tensor([[20.0, 0, 0, 0]]).expand(8, -1)
    diverse = 20.0 * torch.eye(classes).repeat(2, 1)
    loss_uniform, marginal_uniform = information_loss(uniform, 1.0)
    loss_one, marginal_one = information_loss(one_class, 1.0)
    loss_diverse, _ = information_loss(diverse, 1.0)
    assert loss_uniform.item() == pytest.approx(0.0, abs=1e-6)  # log C - log C
    assert marginal_uniform.item() == pytest.approx(math.log(classes))
    assert loss_one.item() == pytest.approx(0.0, abs=1e-4) and marginal_one.item() == pytest.approx(0, abs=1e-4)
    assert loss_diverse.item() == pytest.approx(-math.log(classes), abs=1e-4)  # the only minimum


def test_choice_keeps_the_default_unless_the_evidence_is_clear():
    alike = {"knn_blend": -1.0, "nearest": -1.0, "generated:0": -1.0}
    assert choose(alike, 0.0) == "knn_blend"  # all score alike: the default stays
    assert choose({"knn_blend": -1.0, "nearest": -1.04}, 0.05) == "knn_blend"  # within the margin
    assert choose({"knn_blend": -1.0, "nearest": -1.2}, 0.05) == "nearest"
    assert choose({"knn_blend": -1.0, "nearest": -9.0}, None) == "knn_blend"  # selection off


def test_zero_label_is_deterministic_and_only_ever_lowers_the_loss(generator, location_frames):
    _, frames, _ = location_frames
    start = generator.location_means[0]
    config = ZeroLabelConfig(steps=5, max_seconds=math.inf)
    first = zero_label(generator, {"nearest": start}, frames, config)
    second = zero_label(generator, {"nearest": start}, frames, config)
    assert torch.equal(first.vector, second.vector)
    assert first.stopped == "steps" and first.steps == 5 and not torch.equal(first.vector, start)
    assert first.loss_after < first.loss_before


def test_time_bound_and_collapse_guard_return_the_start(generator, location_frames):
    _, frames, _ = location_frames
    start = generator.location_means[0]
    vector, steps, stopped, before, after = adapt_unlabelled(
        generator, start, frames, ZeroLabelConfig(steps=50, max_seconds=1e-9)
    )
    assert steps == 0 and torch.equal(vector, start) and before == after
    # no diversity term and a guard that trips at any loss of marginal entropy
    config = ZeroLabelConfig(steps=30, lr=0.1, diversity=0.0, collapse_fraction=0.999, max_seconds=math.inf)
    vector, steps, stopped, before, after = adapt_unlabelled(generator, start, frames, config)
    assert stopped == "collapse" and torch.equal(vector, start) and before == after


def test_infer_with_frames_applies_the_regions_setting(generator, location_frames):
    background, frames, _ = location_frames
    plain = infer(generator, [background])
    off = infer(generator, [background], InferenceOptions(frames=frames))
    assert off.policy_applied == "zerolabel" and off.metadata["zerolabel_stopped"] == "off"
    assert torch.equal(off.vector, plain.vector)  # the default table: frames change nothing

    table = ServingTable((Region("all", None, "generate", zerolabel_margin=0.0, zerolabel_steps=3),))
    on = infer(generator, [background], InferenceOptions(frames=frames), table=table)
    assert next(iter(on.zerolabel.losses)) == plain.method  # the default first
    assert on.zerolabel.losses.keys() >= {"generated:0", "generated:1", "base"}
    assert on.metadata["zerolabel_frames"] == "32" and on.metadata["policy_applied"] == "zerolabel"
    again = infer(generator, [background], InferenceOptions(frames=frames), table=table)
    assert torch.equal(on.vector, again.vector)

    few = dataclasses.replace(table.regions[0], zerolabel_min_frames=33)
    below = infer(generator, [background], InferenceOptions(frames=frames), table=ServingTable((few,)))
    assert torch.equal(below.vector, plain.vector) and below.metadata["zerolabel_stopped"] == "off"


def test_shots_decide_over_frames(generator, location_frames):
    background, frames, labels = location_frames
    names = tuple(generator.classes[i] for i in labels[:4].tolist())
    options = InferenceOptions(frames=frames, shots=frames[:4], labels=names, candidates=2)
    result = infer(generator, [background], options)
    assert result.policy_applied == "fewshot" and result.zerolabel is None


def test_serving_table_round_trips_zerolabel_settings_and_reads_old_tables():
    region = Region("ood", None, "knn_blend", 12, zerolabel_margin=0.05, zerolabel_steps=20, zerolabel_min_frames=64)
    table = ServingTable((region,), chosen_on="a test")
    data = table.to_dict()
    assert data["regions"][0]["zerolabel"] == {"select_margin": 0.05, "steps": 20, "min_frames": 64}
    assert ServingTable.from_dict(data) == table
    del data["regions"][0]["zerolabel"]  # a table written before zero labels existed
    old = ServingTable.from_dict(data).regions[0]
    assert not old.zerolabel(256, 3.0).active
    assert region.zerolabel(64, 3.0).active and not region.zerolabel(63, 3.0).active
