"""Anchored sampling, per-location distances, the serving table and `infer` on the smoke store."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from model_store import retrieval
from model_store.condition import split_backgrounds, standardize
from model_store.generator import SAMPLING_BLOCK, Generator, StoredConditions
from model_store.inference import (
    SERVING_FILE,
    InferenceOptions,
    OutOfDistribution,
    Region,
    ServingTable,
    infer,
    infer_batch,
    load_serving_table,
)
from model_store.lora import flatten
from model_store.ood import load_fallback
from model_store.store import Store, StoreError

TABLE = {
    "version": 1,
    "regions": [
        {"region": "seen", "max_distance": 1.4, "method": "generate"},
        {"region": "between", "max_distance": 2.3, "method": "anchored"},
        {"region": "ood", "max_distance": None, "method": "knn_blend"},
    ],
    "knn_blend": {"k": 2, "weighting": "uniform"},
    "anchored": {"strength": 0.5, "steps": 10},
    "chosen_on": "a test",
}


@pytest.fixture(scope="module")
def generator(smoke_store):
    return Generator.from_store(Store(smoke_store))


@pytest.fixture(scope="module")
def frames(smoke_world):
    """(a training-half background of a seen location, a held-out one of another, a flat magenta frame)."""
    seen = json.loads((smoke_world / "tasks.json").read_text())["seen"]

    def background(location, half):
        path = split_backgrounds(sorted((smoke_world / "backgrounds" / location).glob("*.png")))[half][0]
        return Image.open(path).convert("RGB")

    return background(seen[0], 0), background(seen[1], 1), Image.new("RGB", (32, 32), (255, 0, 255))


@pytest.fixture(scope="module")
def features(generator, frames):
    return generator.embed(list(frames))  # (3, D)


def padded(rows: torch.Tensor | list) -> torch.Tensor | list:
    """Rows -> one block of `SAMPLING_BLOCK` (the last row repeated), as `generate_vectors` computes them."""
    extra = SAMPLING_BLOCK - len(rows)
    if torch.is_tensor(rows):
        return torch.cat([rows, rows[-1:].expand(extra, *rows.shape[1:])])
    return rows + rows[-1:] * extra


def old_sample_latents(g: Generator, features: torch.Tensor, seeds: list[int], steps: int) -> torch.Tensor:
    """The generator's sampling loop as it was before anchors and blocks: DDIM from each seed's noise."""
    condition = standardize(features, g.condition_mean, g.condition_std)
    latents = torch.stack([torch.randn(g.vae.latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    scheduler = DDIMScheduler.from_config(g.scheduler_config)
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        latents = scheduler.step(
            g.denoiser(latents, t.expand(len(latents)), condition), t, latents, eta=0.0
        ).prev_sample
    return latents


# -----------------------------------------------------------------------------
# the generator


def test_no_anchor_is_bit_identical_to_the_old_path(generator, features):
    with torch.no_grad():
        latents = old_sample_latents(generator, padded(features), padded([3, 4, 5]), 5)
        old = generator.normalization.denormalize(generator.vae.decode(latents))[:3]
    assert torch.equal(generator.generate_vectors(features, [3, 4, 5], 5), old)
    assert torch.equal(generator.generate_vectors(features, [3, 4, 5], 5, anchor=None, strength=1.0), old)


def test_strength_zero_is_the_anchor_reconstruction(generator, features):
    anchor = generator.location_means[:3]  # (3, P)
    g = generator
    with torch.no_grad():
        expected = g.normalization.denormalize(g.vae.decode(g.vae.encode(g.normalization.normalize(padded(anchor)))))
    assert torch.equal(g.generate_vectors(features, [0, 1, 2], 10, anchor=anchor, strength=0.0), expected[:3])


def test_a_row_does_not_depend_on_the_rows_beside_it(generator, features):
    """What lets the service batch concurrent requests: the same (condition, seed) gives the same bytes alone,
    at any position of a larger call, and across block boundaries, whatever the other rows are."""
    alone = generator.generate_vectors(features[:1], [7], 4)[0]
    others = torch.randn(2 * SAMPLING_BLOCK + 3, features.shape[1])
    for position in (0, 5, SAMPLING_BLOCK - 1, SAMPLING_BLOCK, 2 * SAMPLING_BLOCK + 2):
        rows = torch.cat([others[:position], features[:1], others[position:]])
        seeds = list(range(100, 100 + position)) + [7] + list(range(200, 200 + len(others) - position))
        assert torch.equal(generator.generate_vectors(rows, seeds, 4)[position], alone), position


def test_anchored_rows_do_not_depend_on_the_rows_beside_them(generator, features):
    g = generator
    anchor = g.location_means[:3]
    alone = g.generate_vectors(features[:1], [1], 10, anchor=anchor[:1], strength=0.5)[0]
    together = g.generate_vectors(features[[2, 1, 0]], [5, 6, 1], 10, anchor=anchor[[2, 1, 0]], strength=0.5)
    assert torch.equal(together[2], alone)


def test_anchored_is_deterministic_per_seed_and_between_anchor_and_noise(generator, features):
    anchor = generator.location_means[:1].expand(2, -1)
    condition = features[:1].expand(2, -1)
    first = generator.generate_vectors(condition, [7, 8], 10, anchor=anchor, strength=0.5)
    assert torch.equal(first, generator.generate_vectors(condition, [7, 8], 10, anchor=anchor, strength=0.5))
    assert not torch.equal(first[0], first[1])  # each seed its own noise
    free = generator.generate_vectors(condition, [7, 8], 10)
    assert not torch.equal(first, free)
    full = generator.generate_vectors(condition, [7, 8], 10, anchor=anchor, strength=1.0)
    assert torch.isfinite(full).all() and not torch.equal(full, free)  # t = T-1 keeps a trace of the anchor


def test_anchor_arguments_are_checked(generator, features):
    anchor = generator.location_means[:1]
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match="strength must be in"):
            generator.generate_vectors(features[:1], [0], 5, anchor=anchor, strength=strength)
    with pytest.raises(ValueError, match="needs an anchor"):
        generator.generate_vectors(features[:1], [0], 5, strength=0.5)
    with pytest.raises(ValueError, match="anchors"):
        generator.generate_vectors(features[:2], [0, 1], 5, anchor=anchor, strength=0.5)
    with pytest.raises(ValueError, match="flat adapters"):
        generator.generate_vectors(features[:1], [0], 5, anchor=anchor[:, :10], strength=0.5)


def test_location_distances_row_min_is_the_distance(generator, features):
    per_location = generator.location_distances(features)
    assert per_location.shape == (3, len(generator.locations))
    assert torch.equal(per_location.min(dim=1).values, generator.distance(features))
    nearest = [generator.locations[i] for i in per_location.argmin(dim=1).tolist()]
    assert nearest == generator.nearest_location(features)


def test_location_means_are_the_stored_fallback(generator, smoke_store):
    assert torch.equal(generator.location_means, load_fallback(Store(smoke_store)))


def compose(g: Generator, location_means: torch.Tensor | None = None) -> Generator:
    """A generator built from another's parts (no store), with `location_means` of its own."""
    conditions = StoredConditions(
        g.locations, g.references, g.reference_locations, g.condition_mean, g.condition_std, g.distance_scale
    )
    return Generator(
        g.classifier, g.backbone_config, g.layout, g.encoder, conditions, g.normalization, g.vae, g.denoiser,
        g.scheduler_config, classes=g.classes, location_means=location_means,
    )  # fmt: skip


def test_a_generator_composed_from_parts_equals_the_stored_one(generator, features):
    composed = compose(generator)
    assert composed.location_means is None and composed.store_id == ""
    assert torch.equal(
        composed.generate_vectors(features, [1, 2, 3], 4), generator.generate_vectors(features, [1, 2, 3], 4)
    )
    assert torch.equal(composed.location_distances(features), generator.location_distances(features))
    with pytest.raises(ValueError, match="location means of shape"):
        compose(generator, generator.location_means[:, :5])


# -----------------------------------------------------------------------------
# the serving table


def test_serving_table_picks_regions_in_order():
    table = ServingTable.from_dict(TABLE)
    assert table.method_for(0.0) == ("seen", "generate")
    assert table.method_for(1.4) == ("seen", "generate")
    assert table.method_for(1.5) == ("between", "anchored")
    assert table.method_for(99.0) == ("ood", "knn_blend")
    assert (table.knn_k, table.knn_weighting, table.anchored_strength) == (2, "uniform", 0.5)
    assert table.to_dict() == TABLE
    assert ServingTable.DEFAULT.method_for(1e9) == ("all", "generate")
    with_counts = {**TABLE, "regions": [{**r, "locations": 2} for r in TABLE["regions"]]}
    assert ServingTable.from_dict(with_counts).to_dict() == with_counts
    # tables written before `anchored.steps` were all chosen at 10 steps
    assert ServingTable.from_dict({**TABLE, "anchored": {"strength": 0.5}}).anchored_steps == 10


@pytest.mark.parametrize(
    "change, message",
    [
        ({"version": 2}, "version"),
        ({"regions": []}, "at least one region"),
        ({"regions": TABLE["regions"][:2]}, "only the last region"),
        ({"regions": [{"region": "all", "max_distance": None, "method": "magic"}]}, "unknown serving methods"),
        ({"knn_blend": {"k": 0, "weighting": "uniform"}}, "k must be at least 1"),
        ({"knn_blend": {"k": 2, "weighting": "median"}}, "weighting"),
        ({"anchored": {"strength": 2.0}}, "strength"),
        ({"anchored": {"strength": 0.5, "steps": 0}}, "steps must be at least 1"),
        ({"anchored": {}}, "malformed"),
    ],
)
def test_bad_serving_tables_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        ServingTable.from_dict({**TABLE, **change})


def test_load_serving_table(smoke_store, tmp_path):
    assert load_serving_table(Store(smoke_store)) is ServingTable.DEFAULT  # fitted, never evaluated
    root = tmp_path / "store"
    shutil.copytree(smoke_store, root)
    Store(root).save_json(SERVING_FILE, TABLE)
    assert load_serving_table(Store(root)) == ServingTable.from_dict(TABLE)
    Store(root).save_json(SERVING_FILE, {**TABLE, "version": 0})
    with pytest.raises(StoreError, match="serving.json.*version"):
        load_serving_table(Store(root))


# -----------------------------------------------------------------------------
# one inference path


def table_of(method: str, anchored_steps: int = 1) -> ServingTable:
    return ServingTable(
        (Region("all", None, method),), knn_k=2, knn_weighting="inverse_distance", anchored_steps=anchored_steps
    )


def test_anchored_never_samples_with_fewer_steps_than_its_strength_was_chosen_at(generator, frames):
    g, image = generator, frames[1]
    condition = g.embed([image])
    blend = retrieval.knn_blend(g.location_means, g.location_distances(condition)[0], 2, "inverse_distance")
    table = dataclasses.replace(table_of("anchored", anchored_steps=10), anchored_strength=0.3)
    result = infer(g, [image], InferenceOptions(seed=1, steps=2), table=table)
    assert torch.equal(result.vector, g.generate_vectors(condition, [1], 10, anchor=blend[None], strength=0.3)[0])
    assert result.metadata["steps"] == "10"
    # why: at 2 (trailing) steps no timestep lies below 0.3 x T, and the answer would be the blend itself
    at_two = infer(g, [image], InferenceOptions(seed=1, steps=2), table=dataclasses.replace(table, anchored_steps=1))
    assert torch.equal(at_two.vector, g.generate_vectors(condition, [1], 2, anchor=blend[None], strength=0.0)[0])
    assert not torch.equal(at_two.vector, result.vector)


def test_a_failed_draw_fails_only_the_requests_that_needed_it(generator, frames, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("denoiser failed")

    monkeypatch.setattr(generator, "generate_vectors", broken)
    requests = [([frames[0]], InferenceOptions(method="generate")), ([frames[0]], InferenceOptions(method="knn_blend"))]
    drawn, blended = infer_batch(generator, requests, table=table_of("generate"))
    assert isinstance(drawn, RuntimeError) and "denoiser failed" in str(drawn)
    assert blended.method == "knn_blend"


def test_infer_generates_by_default(generator, frames):
    result = infer(generator, [frames[0]], InferenceOptions(seed=4, steps=5))
    assert (result.method, result.region, result.policy_applied) == ("generate", "all", "generate")
    assert result.in_distribution and result.distance < 1e-3
    [expected] = generator.generate([frames[0]], seeds=4, steps=5)
    assert torch.equal(result.vector, flatten(expected, generator.shapes))
    assert all(torch.equal(result.state[k], expected[k]) for k in expected)
    assert result.metadata["method"] == "generate" and result.metadata["region"] == "all"
    assert result.metadata["policy_applied"] == "generate" and result.metadata["seed"] == "4"


@pytest.mark.parametrize("explicit", [False, True])
def test_infer_serves_each_method(generator, frames, explicit):
    g, image = generator, frames[1]
    condition = g.embed([image])
    distances = g.location_distances(condition)[0]
    blend = retrieval.knn_blend(g.location_means, distances, 2, "inverse_distance")
    expected = {
        "generate": g.generate_vectors(condition, [3], 5)[0],
        "nearest": retrieval.nearest(g.location_means, distances),
        "knn_blend": blend,
        "anchored": g.generate_vectors(condition, [3], 5, anchor=blend[None], strength=0.5)[0],
    }
    for method, vector in expected.items():
        table, options = table_of(method), InferenceOptions(seed=3, steps=5, policy="generate")
        if explicit:
            table, options = table_of("generate"), dataclasses.replace(options, method=method)
        result = infer(g, [image], options, table=table)
        assert result.method == method == result.metadata["method"]
        assert torch.equal(result.vector, vector), method
        again = infer(g, [image], options, table=table)
        assert torch.equal(again.vector, result.vector)
    assert not torch.equal(expected["knn_blend"], expected["nearest"])


def test_out_of_distribution_policies(generator, frames):
    g, odd = generator, frames[2]
    with pytest.raises(OutOfDistribution, match="out of distribution") as refused:
        infer(g, [odd], InferenceOptions(policy="reject"))
    assert refused.value.distance > refused.value.threshold and isinstance(refused.value, ValueError)

    fallback = infer(g, [odd], InferenceOptions(policy="fallback"))
    assert not fallback.in_distribution
    assert (fallback.method, fallback.policy_applied) == ("nearest", "fallback-nearest")
    assert torch.equal(fallback.vector, g.location_means[g.locations.index(fallback.nearest_location)])

    # a retrieval method is already the answer out of distribution: fallback leaves it
    blended = infer(g, [odd], InferenceOptions(policy="fallback", method="knn_blend"), table=table_of("generate"))
    assert (blended.method, blended.policy_applied) == ("knn_blend", "generate")
    generated = infer(g, [odd], InferenceOptions(policy="generate", seed=2, steps=3))
    assert (generated.method, generated.policy_applied) == ("generate", "generate")


def test_without_location_means(generator, frames):
    bare = compose(generator)  # as a store fitted before the means were stored
    with pytest.raises(ValueError, match="method knn_blend needs the seen locations' mean adapters"):
        infer(bare, [frames[0]], InferenceOptions(method="knn_blend"))
    chosen = infer(bare, [frames[0]], InferenceOptions(steps=3), table=table_of("anchored"))
    assert chosen.method == "generate"  # a table cannot choose what the store cannot serve
    base = infer(bare, [frames[2]], InferenceOptions(policy="fallback"))
    assert (base.method, base.policy_applied) == ("base", "fallback-base") and not base.vector.any()


def test_bad_options_are_refused(generator, frames):
    for options, message in [
        ({"policy": "maybe"}, "unknown policy"),
        ({"method": "magic"}, "unknown method"),
        ({"frame_rule": "median"}, "unknown frame rule"),
        ({"steps": 0}, "steps"),
    ]:
        with pytest.raises(ValueError, match=message):
            InferenceOptions(**options)
    with pytest.raises(ValueError, match="steps: at most"):
        infer(generator, [frames[0]], InferenceOptions(steps=10**6))
    with pytest.raises(ValueError, match="0 shot files but 1 labels"):
        infer(generator, [frames[0]], InferenceOptions(labels=("empty",)))
