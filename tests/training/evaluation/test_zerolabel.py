"""Zero-label evaluation (training/evaluation/zerolabel.py): train pixels only, options chosen on val."""

from __future__ import annotations

from model_store.generator import Generator
from model_store.inference import Region, ServingTable
from model_store.store import Store
from training.data import read_cct
from training.evaluation.config import ZeroLabelEvalConfig
from training.evaluation.targets import load_tasks
from training.evaluation.zerolabel import Location, choose_options, evaluate_zerolabel, fewest_frames

CONFIG = ZeroLabelEvalConfig(frames=(4, 8), choose_at=8, steps=2, max_locations=2)


def location(region: str) -> Location:
    return Location(None, region, {}, 0.0, 0.0, {})


def results(off: float, **others: float) -> dict:
    return {"off": {"val": off}, **{name.replace("_", "+"): {"val": v} for name, v in others.items()}}


def test_an_option_replaces_off_only_when_val_says_so_clearly():
    pairs = [
        (location("seen"), results(0.90, select=0.902, adapt=0.80, select_adapt=0.80)),
        (location("ood"), results(0.50, select=0.52, adapt=0.55, select_adapt=0.60)),
        (location("ood"), results(0.60, select=0.60, adapt=0.62, select_adapt=0.64)),
    ]
    assert choose_options(pairs, CONFIG) == {"seen": "off", "ood": "select+adapt"}


def test_fewest_frames_is_where_the_option_stops_losing_on_val():
    at = {
        4: [(location("ood"), {"off": {"val": 0.5}, "adapt": {"val": 0.4}})],
        8: [(location("ood"), {"off": {"val": 0.5}, "adapt": {"val": 0.6}})],
        16: [(location("ood"), {"off": {"val": 0.5}, "adapt": {"val": 0.7}})],
    }
    assert fewest_frames(at, {"ood": "adapt"}) == {"ood": 8}
    at[16][0][1]["adapt"]["val"] = 0.4  # losing at the most frames: never
    assert fewest_frames(at, {"ood": "adapt"}) == {"ood": None}


def test_rows_and_table_without_reading_the_labels_of_the_frames(smoke_world, smoke_store, monkeypatch):
    dataset = read_cct(smoke_world)
    generator = Generator.from_store(Store(smoke_store))
    roles = ("seen", "interp", "unseen")
    tasks = {role: load_tasks(dataset, role, {}, generator.backbone_config) for role in roles}
    sections = {
        rq: {"per_task": [{"task": t.location, "pretrain_acc": 0.5, "finetuned_acc": 0.9} for t in tasks[role]]}
        for rq, role in zip(("rq1", "rq2", "rq3"), roles, strict=True)
    }
    table = ServingTable((Region("near", 1.5, "generate"), Region("far", None, "generate")))
    rows, chosen = evaluate_zerolabel(dataset, generator, table, 2.0, tasks, sections, 2, CONFIG)
    assert [(r["split"], r["frames"]) for r in rows] == [(role, n) for n in (4, 8) for role in roles if tasks[role]]
    for row in rows:
        assert row["gain_recovered"] == (row["acc"] - 0.5) / 0.4 and row["regret"] >= 0
    assert [r.name for r in chosen.regions] == ["near", "far"]

    # Train labels scrambled: every row and the chosen table stay exactly the same.
    load = dataset.load

    def scrambled(location, split, image_size):
        pixels, labels = load(location, split, image_size)
        return (pixels, (labels + 1) % len(dataset.categories)) if split == "train" else (pixels, labels)

    monkeypatch.setattr(dataset, "load", scrambled)
    again, chosen_again = evaluate_zerolabel(dataset, generator, table, 2.0, tasks, sections, 2, CONFIG)
    strip = [{k: v for k, v in row.items() if "seconds" not in k} for row in rows]
    assert strip == [{k: v for k, v in row.items() if "seconds" not in k} for row in again]
    assert chosen_again == chosen
