"""Few-shot evaluation (training/evaluation/fewshot.py): shots come from TRAIN only, accuracy from TEST."""

import pytest
import torch

from model_store.adapt import FewShotResult
from model_store.generator import Generator
from model_store.store import Store
from training.data import read_cct
from training.evaluation import fewshot
from training.evaluation.config import FewShotEvalConfig
from training.evaluation.fewshot import draw_shots, evaluate_fewshot
from training.evaluation.scoring import load_frames
from training.evaluation.targets import load_tasks


def test_draw_shots_takes_up_to_k_per_class():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    picked = draw_shots(labels, 2, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[picked]).tolist() == [2, 1, 2]


def test_selection_never_sees_evaluation_frames(smoke_world, smoke_store, monkeypatch):
    dataset = read_cct(smoke_world)
    generator = Generator.from_store(Store(smoke_store))
    tasks = {"unseen": load_tasks(dataset, "unseen", {}, generator.backbone_config)}
    sections = {
        "rq2": {"per_task": []},
        "rq3": {"per_task": [{"task": t.location, "pretrain_acc": 0.5, "finetuned_acc": 0.9} for t in tasks["unseen"]]},
    }
    seen_pixels = []

    def record(generator, features, pixels, labels, **kwargs):
        seen_pixels.append(pixels)
        return FewShotResult(
            torch.zeros(sum(torch.Size(s).numel() for s in generator.shapes.values())), "base", 1, 0, 1
        )

    monkeypatch.setattr(fewshot, "adapt", record)
    rows, seconds = evaluate_fewshot(dataset, generator, None, sections, tasks, 2, FewShotEvalConfig(shots=(1, 2)))
    assert [(r["split"], r["shots"]) for r in rows] == [("unseen", 1), ("unseen", 2)]
    assert rows[0]["gain_recovered"] == pytest.approx((rows[0]["acc"] - 0.5) / 0.4) and seconds

    task = tasks["unseen"][0]
    train = load_frames(dataset, task.location, "train", generator.backbone_config).pixels.flatten(1)
    for shot in seen_pixels[0].flatten(1):
        assert (shot == train).all(1).any()  # a train frame
        assert not (shot == task.test.pixels.flatten(1)).all(1).any()  # never a test frame
        assert not (shot == task.val.pixels.flatten(1)).all(1).any()


def test_refinement_steps_are_chosen_on_val_not_test(smoke_world, smoke_store, monkeypatch):
    dataset = read_cct(smoke_world)
    generator = Generator.from_store(Store(smoke_store))
    tasks = {"unseen": load_tasks(dataset, "unseen", {}, generator.backbone_config)}
    per_task = [{"task": t.location, "pretrain_acc": 0.5, "finetuned_acc": 0.9} for t in tasks["unseen"]]
    sections = {"rq2": {"per_task": []}, "rq3": {"per_task": per_task}}
    size = sum(torch.Size(s).numel() for s in generator.shapes.values())

    def marked(generator, features, pixels, labels, config, **kwargs):  # the vector carries its refine steps
        return FewShotResult(torch.full((size,), float(config.refine_steps)), "base", 1, 0, 1)

    # val prefers 10 refinement steps, test would prefer 100
    preferred = {"val": 10.0, "test": 100.0}

    class SplitScorer:
        def __init__(self, *args):
            pass

        def accuracy(self, vectors, frames):
            return torch.tensor([0.9 if vectors[0, 0].item() == preferred[frames.split] else 0.6])

    monkeypatch.setattr(fewshot, "adapt", marked)
    monkeypatch.setattr(fewshot, "Scorer", SplitScorer)
    config = FewShotEvalConfig(shots=(1,), refine_steps=(0, 10, 100))
    [row], seconds = evaluate_fewshot(dataset, generator, None, sections, tasks, 2, config)
    assert row["refine_steps"] == 10 and row["acc"] == pytest.approx(0.6)  # test accuracy of the val choice
    assert row["val_acc"] == {"0": pytest.approx(0.6), "10": pytest.approx(0.9), "100": pytest.approx(0.6)}
    assert set(seconds) == {"0", "10", "100"}


def test_cli_generate_with_shots(smoke_store, smoke_world, tmp_path, capsys):
    from safetensors import safe_open

    from training.cli import main

    location = sorted((smoke_world / "images").iterdir())[0]
    shots = [str(p) for p in sorted(location.glob("*.png"))[:2]]
    image = sorted((smoke_world / "backgrounds").glob("*/001.png"))[0]
    args = ["generate", "--store", str(smoke_store), "--background", str(image), "--steps", "5", "--candidates", "3"]
    out = tmp_path / "adapter"
    assert main([*args, "--out", str(out), "--shots", *shots, "--labels", "empty", "empty"]) == 0
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert f.metadata()["fewshot_candidates"] == "5"  # 3 generated + nearest + base
    assert main([*args, "--out", str(tmp_path / "bad"), "--shots", *shots, "--labels", "empty"]) == 2
    assert "2 shot files but 1 labels" in capsys.readouterr().err
