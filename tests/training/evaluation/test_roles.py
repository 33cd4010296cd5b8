"""Evaluation: baselines and novelty against closed-form answers, selection that never sees test, report schema."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from model_store.backbone import BackboneConfig, build_classifier
from model_store.lora import LoraLayout, adapter_shapes
from training.data import read_cct
from training.evaluation import baselines, roles, scoring, serving
from training.evaluation.baselines import LocationIndex
from training.evaluation.config import AnchoredConfig, EvalConfig, HypernetConfig
from training.evaluation.roles import Setup
from training.evaluation.scoring import Frames, Scorer
from training.evaluation.signals import auroc
from training.evaluation.targets import Task, held_out_frames
from training.zoo import Zoo


@pytest.fixture(autouse=True)
def one_thread():
    """As `evaluate` does: many tiny forward passes are far slower with two threads on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -----------------------------------------------------------------------------
# baselines on a hand-made zoo: three locations, two checkpoints each, P = 2
#   A: (0,0) (2,0) -> mean (1,0)    B: (0,2) (0,4) -> mean (0,3)    C: (4,4) (6,6) -> mean (5,5)


@pytest.fixture
def zoo():
    vectors = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 4.0], [4.0, 4.0], [6.0, 6.0]])
    return Zoo(["A", "B", "C"], vectors, torch.tensor([0, 0, 1, 1, 2, 2]))


DISTANCES = torch.tensor([1.0, 2.0, 4.0])  # the condition is closest to A, then B, then C


def close(a, b):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.tensor(b), atol=1e-5)


def test_average_ignores_the_condition(zoo):
    assert close(baselines.average(zoo), [2.0, 16 / 6])


def test_nearest_is_the_closest_locations_mean(zoo):
    assert close(baselines.nearest(zoo, DISTANCES), [1.0, 0.0])
    assert close(baselines.nearest(zoo, torch.tensor([3.0, 2.0, 0.5])), [5.0, 5.0])


def test_knn_blend(zoo):
    assert close(baselines.knn_blend(zoo, DISTANCES, 1, "uniform"), [1.0, 0.0])
    assert close(baselines.knn_blend(zoo, DISTANCES, 2, "uniform"), [0.5, 1.5])
    # inverse distance: weights 1/1 and 1/2 -> 2/3 and 1/3
    assert close(baselines.knn_blend(zoo, DISTANCES, 2, "inverse_distance"), [2 / 3, 1.0])
    assert close(baselines.knn_blend(zoo, DISTANCES, 10, "uniform"), [2.0, 8 / 3])  # k capped at L
    with pytest.raises(ValueError, match="weighting"):
        baselines.knn_blend(zoo, DISTANCES, 2, "softmax")


def test_midpoint(zoo):
    assert close(baselines.midpoint(zoo, "A", "C"), [3.0, 2.5])


def test_noise_with_zero_sigma_returns_checkpoints_of_the_location(zoo):
    samples = baselines.noise(zoo, "B", 0.0, 20, torch.Generator().manual_seed(0))
    assert all(any(torch.equal(s, c) for c in zoo.of("B")) for s in samples)
    noisy = baselines.noise(zoo, "B", 1.0, 4000, torch.Generator().manual_seed(0))
    residual = noisy - noisy.round()  # checkpoints are integers; noise of 1 z-score unit per coordinate
    assert residual.std(0).gt(0.2).all()


def test_gaussian_is_fitted_to_the_locations_checkpoints(zoo):
    samples = baselines.gaussian(zoo, "A", 20000, torch.Generator().manual_seed(0))
    assert close(samples.mean(0), [1.0, 0.0]) or torch.allclose(samples.mean(0), torch.tensor([1.0, 0.0]), atol=0.05)
    assert abs(samples[:, 0].std().item() - math.sqrt(2)) < 0.05  # sample std of {0, 2}
    assert torch.equal(samples[:, 1], torch.zeros(20000))  # a coordinate that never moves stays put


def test_location_index_uses_each_locations_closest_frame():
    features = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 3.0], [5.0, 5.0]])
    index = LocationIndex(features, torch.tensor([0, 0, 1, 2]), mean=torch.zeros(2), std=torch.ones(2))
    assert close(index.distances(torch.tensor([9.0, 0.0])), [1.0, math.hypot(9, 3), math.hypot(4, 5)])


def test_hypernet_regresses_each_locations_mean_adapter(zoo):
    features = torch.tensor([[0.0, 0.0], [0.0, 0.1], [3.0, 0.0], [3.0, 0.1], [0.0, 3.0], [0.1, 3.0]])
    index = LocationIndex(features, torch.tensor([0, 0, 1, 1, 2, 2]))
    model = baselines.fit_hypernet(index, zoo, HypernetConfig(hidden=32, steps=150, batch_size=32, lr=1e-2))
    prediction = model(torch.tensor([[0.0, 0.05], [3.0, 0.05], [0.05, 3.0]]))
    assert torch.allclose(prediction, zoo.means, atol=0.5)


# -----------------------------------------------------------------------------
# novelty


def test_a_replica_has_nn_ratio_zero_and_iou_one(zoo):
    typical = baselines.typical_nn_distance(zoo)
    assert baselines.nn_l2_ratio(zoo.vectors[3:4], zoo, typical).item() == pytest.approx(0.0, abs=1e-6)
    wrong = torch.tensor([[True, False, True, False]])
    assert baselines.max_iou(wrong, torch.cat([~wrong, wrong])).item() == 1.0


def test_nn_l2_ratio_of_a_checkpoint_step_is_about_one():
    # a run of checkpoints one unit apart: the typical neighbour distance is one step
    vectors = torch.stack([torch.tensor([float(i), 0.0]) for i in range(5)] + [torch.tensor([0.0, 1.0])])
    line = Zoo(["A"], vectors, torch.zeros(6, dtype=torch.long))
    line.scale = torch.ones(2)  # distances in raw units for this check
    typical = baselines.typical_nn_distance(line)
    assert typical == pytest.approx(1.0)
    assert baselines.nn_l2_ratio(torch.tensor([[5.0, 0.0], [2.5, 0.0]]), line, typical).tolist() == pytest.approx(
        [1.0, 0.5]
    )


def test_location_spacing(zoo):
    zoo.scale = torch.ones(2)  # raw units: means (1,0), (0,3), (5,5)
    # nearest other mean: A-B sqrt(10), B-A sqrt(10), C-B sqrt(29) -> median sqrt(10)
    assert baselines.location_spacing(zoo) == pytest.approx(math.sqrt(10))


def test_max_iou_known_cases():
    wrong = torch.tensor([[True, True, False, False], [False, False, False, False]])
    training = torch.tensor([[True, False, True, False], [False, False, False, False]])
    # row 0: best is 1 shared of 3 wrong overall; row 1: never wrong, like the second checkpoint
    assert baselines.max_iou(wrong, training).tolist() == pytest.approx([1 / 3, 1.0])


def test_auroc():
    assert auroc([0.0, 1.0], [2.0, 3.0]) == 1.0
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 0.0
    assert auroc([1.0, 1.0], [1.0]) == 0.5
    assert auroc([1.0], []) is None  # no unseen locations


# -----------------------------------------------------------------------------
# evaluate_role on a tiny fake world: schema, and selection that only ever sees val

BACKBONE = BackboneConfig(width=16, layers=2, heads=2, image_size=16, patch_size=8, embed_dim=8, num_classes=3)
LAYOUT = LoraLayout(rank=1, alpha=2.0, blocks=2)
COLOURS = {"A": (200, 30, 30), "B": (30, 200, 30), "C": (30, 30, 200), "X": (120, 120, 30), "Y": (250, 250, 250)}


class FakeGenerator:
    """The Generator API on a tiny classifier: features = mean colour, samples = nearest mean + seeded noise."""

    def __init__(self, classifier, zoo: Zoo):
        self.classifier, self.layout = classifier, LAYOUT
        self.shapes = adapter_shapes(classifier, LAYOUT)
        self.zoo = zoo
        self.locations = list(zoo.locations)
        # two stored frames per location: its colour, and its colour a shade greener
        frames = [(r, g + shade, b) for (r, g, b) in (COLOURS[loc] for loc in zoo.locations) for shade in (0, 1)]
        self.references = torch.tensor(frames, dtype=torch.float)
        self.reference_locations = torch.arange(len(zoo.locations)).repeat_interleave(2)
        self.condition_mean, self.condition_std = torch.zeros(3), torch.full((3,), 50.0)

    def embed(self, images):
        return torch.stack([torch.tensor(image.getpixel((0, 0)), dtype=torch.float) for image in images])

    def distance(self, features):
        return torch.cdist(features, self.references).min(1).values

    def generate_vectors(self, features, seeds, steps=50, anchor=None, strength=1.0):
        """Anchored: the anchor plus noise growing with the strength (0: the anchor itself)."""
        index = torch.cdist(features, self.references).argmin(1)
        rows = []
        for row, (i, seed) in enumerate(zip(index.tolist(), seeds, strict=True)):
            noise = torch.randn(self.zoo.vectors.shape[1], generator=torch.Generator().manual_seed(seed))
            if anchor is None:
                rows.append(self.zoo.means[self.reference_locations[i]] + 0.01 * noise)
            else:
                rows.append(anchor[row] + strength * 0.3 * noise)
        return torch.stack(rows)


def frames(location, split, seed, n=24):
    g = torch.Generator().manual_seed(seed)
    return Frames(location, split, torch.randn(n, 3, 16, 16, generator=g), torch.randint(3, (n,), generator=g))


@pytest.fixture(scope="module")
def fake_setup():
    torch.manual_seed(0)
    classifier = build_classifier(BACKBONE).requires_grad_(False).eval()
    shapes = adapter_shapes(classifier, LAYOUT)
    size = sum(torch.Size(s).numel() for s in shapes.values())
    g = torch.Generator().manual_seed(1)
    centres = 0.3 * torch.randn(3, size, generator=g)
    vectors = centres.repeat_interleave(4, 0) + 0.05 * torch.randn(12, size, generator=g)
    zoo = Zoo(["A", "B", "C"], vectors, torch.arange(3).repeat_interleave(4))
    generator = FakeGenerator(classifier, zoo)
    index = LocationIndex(generator.references, generator.reference_locations, torch.zeros(3), torch.full((3,), 50.0))
    hypernet = baselines.fit_hypernet(index, zoo, HypernetConfig(hidden=16, steps=20, batch_size=8))
    scorer = Scorer(classifier, LAYOUT, shapes)
    return Setup(generator, scorer, zoo, {}, index, hypernet, baselines.typical_nn_distance(zoo))


def reference_run(val_accs, test_accs):
    return {"checkpoints": [{"val_acc": v, "test_acc": t} for v, t in zip(val_accs, test_accs, strict=True)]}


def make_tasks(test_labels_seed=100):
    tasks = []
    for i, (location, role, sources) in enumerate(
        [("X", "interp", ("A", "B", "high")), ("Y", "interp", ("B", "C", "low"))]
    ):
        tasks.append(
            Task(
                location=location,
                role=role,
                frame_name=f"{location}.png",
                frame=Image.new("RGB", (16, 16), COLOURS[location]),
                val=frames(location, "val", seed=i),
                test=frames(location, "test", seed=test_labels_seed + i),
                references=[reference_run([0.5, 0.9, 0.7], [0.6, 0.8, 0.95])],
                sources=sources[:2],
                similarity=sources[2],
            )
        )
    return tasks


CONFIG = EvalConfig(samples=3, baseline_samples=2, knn_ks=(1, 2), noise_sigmas=(0.1, 1.0), iou_neighbours=2)


def test_role_report_schema(fake_setup):
    result, generated = roles.evaluate_role(fake_setup, make_tasks(), CONFIG)
    row = result["per_task"][0]
    for key in (
        "task",
        "pretrain_acc",
        "finetuned_acc",
        "finetuned_best_acc",
        "generated_acc",
        "generated_selected_acc",
    ):
        assert key in row
    assert set(row["baselines"]) == {"average", "nearest", "knn_blend", "hypernet", "noise", "gaussian", "midpoint"}
    assert set(row["novelty"]) == {"max_iou", "nn_l2_ratio"}
    assert row["finetuned_acc"] == pytest.approx((0.6 + 0.8 + 0.95) / 3)
    assert row["finetuned_best_acc"] == 0.8  # best on VAL (0.9), not the best test accuracy (0.95)
    assert row["nearest_location"] == "A" and row["similarity"] == "high"
    assert result["summary"]["generated_acc"] == pytest.approx(sum(r["generated_acc"] for r in result["per_task"]) / 2)
    assert set(result["by_similarity"]) == {"high", "low"}
    assert generated["X"].shape == (3, fake_setup.zoo.vectors.shape[1])
    json.dumps(result)  # plain JSON


def test_selection_refuses_test_frames(fake_setup):
    candidates = fake_setup.zoo.vectors[:2]
    with pytest.raises(ValueError, match="val"):
        scoring.select_sample(fake_setup.scorer, candidates, frames("X", "test", 0))
    with pytest.raises(ValueError, match="val"):
        scoring.choose_option(fake_setup.scorer, {"a": [candidates]}, [frames("X", "test", 0)])


def test_selection_never_receives_test_data(fake_setup, monkeypatch):
    """Every call into the selection functions carries val frames only, and test frames change no choice."""
    calls = []  # (splits seen, choice made) per selection call
    select, choose = scoring.select_sample, scoring.choose_option

    def spy_select(scorer, candidates, val):
        choice = select(scorer, candidates, val)
        calls.append(([val.split], choice))
        return choice

    def spy_choose(scorer, options, vals):
        choice = choose(scorer, options, vals)
        calls.append(([v.split for v in vals], choice))
        return choice

    monkeypatch.setattr(roles, "select_sample", spy_select)
    monkeypatch.setattr(roles, "choose_option", spy_choose)
    first, _ = roles.evaluate_role(fake_setup, make_tasks(test_labels_seed=100), CONFIG)
    first_calls, calls[:] = list(calls), []
    assert len(first_calls) == 2 + 2  # knn_blend and noise per role, one generated sample per task
    assert {split for splits, _ in first_calls for split in splits} == {"val"}

    # Entirely different test frames and labels: the same choices, in the same order.
    second, _ = roles.evaluate_role(fake_setup, make_tasks(test_labels_seed=999), CONFIG)
    assert calls == first_calls
    assert first["selection"] == second["selection"]
    assert [r["finetuned_best_acc"] for r in first["per_task"]] == [r["finetuned_best_acc"] for r in second["per_task"]]


SERVING = replace(CONFIG, anchored=AnchoredConfig(strengths=(0.0, 0.5), samples=2))


def test_paired_differences_have_a_bootstrap_interval():
    rows = [{"baselines": {"knn_blend": 0.5}, "generated_acc": 0.5 + d} for d in (0.01, 0.02, 0.03, 0.04)]
    result = roles.paired(rows, CONFIG)["generated"]
    assert result["diff"] == pytest.approx(0.025) and result["locations"] == 4
    low, high = result["ci95"]
    assert 0.01 <= low < 0.025 < high <= 0.04
    same = roles.paired([{"baselines": {"knn_blend": 0.5, "nearest": 0.6}}] * 3, CONFIG)["nearest"]
    assert same["ci95"] == pytest.approx([0.1, 0.1])  # no spread, no interval


def test_anchored_at_strength_zero_is_the_blend(fake_setup):
    result, _ = roles.evaluate_role(fake_setup, make_tasks(), SERVING, serving_knn="k=2,uniform")
    for row in result["per_task"]:
        assert row["methods"]["anchored@0"] == row["methods"]["knn_blend"]
        assert set(row["methods"]) == {"generate", "knn_blend", "anchored@0", "anchored@0.5", "nearest"}
    assert "paired" in result["summary"] and "generated" in result["summary"]["paired"]


def test_what_the_store_serves_is_chosen_without_test_labels(fake_setup):
    """Perturbing every test label changes no serving choice, only the test accuracies reported."""
    tables, served = [], []
    for seed in (100, 999):
        tasks = make_tasks(test_labels_seed=seed)
        knn = roles.choose_knn(fake_setup, tasks, SERVING)
        sections = {"rq2": roles.evaluate_role(fake_setup, tasks, SERVING, serving_knn=knn)[0]}
        table = serving.choose_serving(sections, SERVING, knn, ood_threshold=None, has_location_means=True)
        serving.apply_serving(sections, table, SERVING)
        tables.append(table.to_dict())
        served.append([row["served_method"] for row in sections["rq2"]["per_task"]])
        row = sections["rq2"]["per_task"][0]
        assert row["served_acc"] == row["methods"][serving.method_name(row["served_method"], 0.0)]["test"] or (
            row["served_method"] == "anchored"
        )
        assert "served" in sections["rq2"]["summary"]["paired"]
    assert tables[0] == tables[1] and served[0] == served[1]


def test_a_store_without_location_means_serves_generation(fake_setup):
    tasks = make_tasks()
    sections = {"rq2": roles.evaluate_role(fake_setup, tasks, SERVING, serving_knn="k=1,uniform")[0]}
    table = serving.choose_serving(sections, SERVING, "k=1,uniform", ood_threshold=None, has_location_means=False)
    assert {region["method"] for region in table.to_dict()["regions"]} == {"generate"}


# -----------------------------------------------------------------------------
# the whole stage on the smoke store: the report of docs/design.md


def test_evaluate_writes_the_design_report(smoke_world, smoke_store, tmp_path):
    import shutil

    from model_store.store import Store
    from training.cli import main

    root = tmp_path / "store"
    shutil.copytree(smoke_store, root)
    assert main(["evaluate", "--data", str(smoke_world), "--store", str(root), "--profile", "smoke", "--quiet"]) == 0

    store = Store.open(root)  # report files are registered and intact
    report = store.load_json("report/report.json")
    fields = {"pretrain_acc", "finetuned_acc", "finetuned_best_acc", "generated_acc", "generated_selected_acc"}
    for rq in ("rq1", "rq2", "rq3"):
        assert report[rq]["per_task"], rq
        for row in [*report[rq]["per_task"], report[rq]["summary"]]:
            assert fields <= set(row) and all(0 <= row[f] <= 1 for f in fields)
            assert {"average", "nearest", "knn_blend", "hypernet", "noise", "gaussian"} <= set(row["baselines"])
            assert ("midpoint" in row["baselines"]) == (rq == "rq2")
            assert set(row["novelty"]) == {"max_iou", "nn_l2_ratio"}
    assert 0 <= report["rq3"]["summary"]["ood_auroc"] <= 1
    assert isinstance(report["fewshot"], list)
    rows = report["representation"]  # smoke: 2 frames per request
    assert {(r["role"], r["variant"]) for r in rows} >= {
        (role, variant)
        for role in ("seen", "interp", "unseen")
        for variant in ("1 frame", "2 frames, mean", "2 frames, closest")
    }
    assert all(0 <= r["val_acc"] <= 1 and 0 <= r["test_acc"] <= 1 and r["locations"] > 0 for r in rows)
    assert report["ablation"]["saving_interval"] == [] and report["scaling"] == []  # studies only when asked
    assert store.load_json("serving.json") == report["serving"]  # what the service will read
    for rq in ("rq1", "rq2", "rq3"):
        assert {"served", "anchored", "generated", "nearest"} <= set(report[rq]["summary"]["paired"])
        methods = {row["served_method"] for row in report[rq]["per_task"]}
        assert methods <= {"generate", "anchored", "knn_blend", "nearest"}
    assert {"finetune_seconds_per_task", "generate_seconds_per_adapter", "speedup"} <= set(report["timing"])
    for name in ("report.md", "pca.png", "accuracy.png"):
        assert store.has(f"report/{name}")
    text = store.path("report/report.md").read_text()
    assert "## RQ1" in text and "| Task | Pretrain | Fine-tuned |" in text and "generation" in text
    assert "## Task representation" in text


def test_the_representation_study_conditions_only_on_held_out_frames(smoke_world):
    dataset = read_cct(smoke_world)
    location = dataset.locations("interp")[0]
    paths = sorted(dataset.backgrounds(location))
    frames = held_out_frames(dataset, location)
    assert len(frames) == len(paths[1::2])
    for frame, path in zip(frames, paths[1::2], strict=True):  # the odd positions: never seen by the generator
        assert np.array_equal(np.asarray(frame), np.asarray(Image.open(path).convert("RGB")))
