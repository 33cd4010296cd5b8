"""Real camera-trap data: CCT ingestion, derived tasks, median backgrounds, pretrained towers from local files,
and `wildpdiff pipeline` end to end with a class subset, on the small real-shaped set of
`tests/training/real_data.py`."""

import json
from collections import Counter

import numpy as np
import pytest
from open_clip.constants import OPENAI_DATASET_MEAN
from PIL import Image
from safetensors.torch import load_file

from model_store.backbone import (
    build_classifier,
    load_backbone,
    load_open_clip_tower,
    normalize,
    open_clip_backbone,
)
from model_store.lora import LoraLayout, adapter_accuracy
from model_store.store import Store
from tests.training.real_data import CLASSES, build_cct, save_tiny_open_clip, scene
from training.backgrounds import BackgroundConfig, median_image, write_backgrounds
from training.cli import main
from training.data import DataError, DatasetSpec, read_cct, read_dataset
from training.tasks import assign_roles
from training.zoo import load_zoo_results


@pytest.fixture(scope="module")
def cct(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_cct")
    return root, build_cct(root)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_open_clip(tmp_path_factory.mktemp("tiny_clip"))


def listing(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_reads_what_real_cct_data_holds(cct):
    root, expected = cct
    dataset = read_cct(root)
    assert dataset.spec.images == root / "images"  # file_names are relative to images/, found without --images
    assert dataset.categories == CLASSES  # "Blank" (id 7, no id 0) became class 0
    assert sorted(dataset.frames) == sorted(expected["locations"])  # "ngare nanyuki/1" -> "ngare_nanyuki_1", 17 -> "17"
    assert (dataset.corrupt, dataset.missing, dataset.unlabelled) == (1, 1, 1)
    # sequence-level labels reach every frame: 27 animal frames in sequences of three, 8 empty frames
    animals = {CLASSES.index(name): 9 for name in ("zebra", "gazelle", "lion")}
    assert Counter(f.label for f in dataset.frames["B05"]) == {**animals, 0: 8}
    pixels, labels = dataset.load(expected["truncated_at"], None, 32)  # frames of 80x60 px -> 32x32
    assert pixels.shape == (len(dataset.frames["B03"]) - 1, 3, 32, 32) and len(labels) == len(pixels)
    assert dataset.unreadable["B03"] == 1
    assert "skipped 4 (corrupt 1, missing 1, unlabelled 1, unreadable 1)" in dataset.summary()


def test_a_class_list_keeps_those_categories_in_its_order(cct, tmp_path, capsys):
    root, _ = cct
    everything = read_cct(root)
    dataset = read_cct(root, classes=["Lion", "zebra", "blank"])  # any case; the empty class is always class 0
    assert dataset.categories == ["empty", "lion", "zebra"]
    gazelles = sum(f.label == CLASSES.index("gazelle") for frames in everything.frames.values() for f in frames)
    assert dataset.other_class == gazelles > 0
    assert Counter(f.label for f in dataset.frames["B05"]) == {1: 9, 2: 9, 0: 8}  # lion 1, zebra 2, no gazelles
    assert f"other class {gazelles}" in dataset.summary()
    with pytest.raises(DataError, match=r"classes not among the categories: \['okapi'\]"):
        read_cct(root, classes=["zebra", "okapi"])

    classes, tasks = tmp_path / "classes.json", tmp_path / "tasks.json"
    classes.write_text(json.dumps(["zebra"]))
    tasks.write_text(json.dumps({"pretrain": [17], "seen": ["B03", "ngare nanyuki/1"]}))
    store = tmp_path / "store"
    common = ["--data", str(root), "--store", str(store), "--tasks", str(tasks), "--profile", "smoke", "--quiet"]
    assert main(["pretrain", *common, "--steps", "2", "--classes", str(classes)]) == 0
    assert Store.open(store).manifest["classes"] == ["empty", "zebra"]
    capsys.readouterr()
    # a later stage without the same class list is refused, not trained on shifted labels
    assert main(["zoo", *common]) == 2
    assert "pass the same --classes on every stage" in capsys.readouterr().err


def test_tasks_are_derived_by_the_documented_rules(cct):
    root, expected = cct
    dataset = assign_roles(read_cct(root))
    for role in ("pretrain", "seen", "interp", "unseen"):
        assert dataset.locations(role) == expected[role], role
    a, b, similarity = dataset.tasks["interp_sources"]["mid_B03"]
    assert {a, b} == set(expected["interp_sources"]) and similarity in ("high", "low")
    assert dataset.tasks["derived"]["animal_frames"]["tiny"] == 5
    assert any(note.startswith("tasks derived from label counts") for note in dataset.notes)
    assert dataset.spec.tasks == dataset.tasks  # a worker reading the spec gets these roles without deriving them
    assert read_dataset(dataset.spec).tasks == dataset.tasks


def test_explicit_tasks_override_and_are_checked(cct):
    root, _ = cct
    dataset = read_cct(root, tasks={"pretrain": [17], "seen": ["B03", "ngare nanyuki/1"], "unseen": ["pink"]})
    assert dataset.locations("seen") == ["B03", "ngare_nanyuki_1"] and dataset.locations("interp") == []
    with pytest.raises(DataError, match="more than one role"):
        read_cct(root, tasks={"pretrain": ["17"], "seen": ["17", "B03"]})


def test_a_wrong_image_folder_is_named_before_roles_are_derived(cct, tmp_path, capsys):
    root, _ = cct
    dataset = read_cct(root)
    listed = sum(len(frames) for frames in dataset.frames.values()) + dataset.missing
    store = tmp_path / "store"
    argv = ["pretrain", "--data", str(root), "--images", str(root), "--store", str(store), "--profile", "smoke"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {listed} of {listed} listed image files are missing under {root} ")
    assert "pass --images DIR" in err and err.count("\n") == 1
    assert not store.exists()


@pytest.mark.parametrize(
    ("categories", "classes"),
    [
        ([{"id": 0, "name": "empty"}, {"id": 9, "name": "Blank"}, {"id": 3, "name": "zebra"}], ["empty", "zebra"]),
        ([{"id": "lion", "name": "lion"}, {"id": 5, "name": "no_animal"}], ["empty", "lion"]),
        (
            [{"id": 0, "name": "empty"}, {"id": 12, "name": "eland"}, {"id": 2, "name": "topi"}],
            ["empty", "topi", "eland"],
        ),
    ],
)
def test_empty_categories_merge_into_class_zero(tmp_path, categories, classes):
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    images = [{"id": i, "file_name": "a.png", "location": "L"} for i in range(len(categories))]
    annotations = [{"id": i, "image_id": i, "category_id": c["id"]} for i, c in enumerate(categories)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    dataset = read_cct(tmp_path)
    assert dataset.categories == classes
    empties = sum(c["name"].lower() in ("empty", "blank", "no_animal") for c in categories)
    assert sum(f.label == 0 for f in dataset.frames["L"]) == empties


def test_median_background_keeps_the_scene_and_drops_what_moves(tmp_path):
    base = scene(5, (64, 48))
    paths = []
    for k in range(3):
        pixels = base.copy()
        if k == 1:
            pixels[10:30, 20:40] = (250, 250, 250)  # an animal in a frame labelled empty
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray(pixels.astype(np.uint8)).save(paths[-1])
    median = np.asarray(median_image(paths, max_side=448), dtype=float)
    assert np.abs(median - base.astype(np.uint8)).max() <= 1


def test_backgrounds_per_time_of_day_from_train_and_val_empties(cct, tmp_path):
    root, expected = cct
    dataset = read_cct(root)
    before = listing(root)
    written = write_backgrounds(dataset, tmp_path, expected["locations"], BackgroundConfig(frames=3), progress=False)
    assert listing(root) == before  # the dataset folder is never written to
    names = {p.name for p in written if p.parent.name == "ngare_nanyuki_1"}  # 4 of its 8 empty frames are at night
    assert any(n.startswith("day_") for n in names) and any(n.startswith("night_") for n in names)
    for location in expected["seen"] + expected["interp"] + expected["unseen"]:
        assert len(list((tmp_path / location).glob("*.png"))) >= 2  # one to train on, one held out
    mixed = Image.open(tmp_path / "B05" / "day_00.png")  # frames of 64x48 and 96x72 px in one median
    assert abs(np.asarray(mixed, dtype=float) - scene(3, mixed.size)).mean() < 6
    assert write_backgrounds(dataset, tmp_path, expected["locations"], progress=False) == []  # resumable


def test_open_clip_tower_loads_from_a_local_file(tiny_clip):
    config_file, weights = tiny_clip
    config = open_clip_backbone(str(config_file), weights)
    assert (config.kind, config.model_name, config.image_size, config.width, config.heads, config.layers) == (
        "open_clip",
        "wpd-tiny-vit",
        32,
        64,
        2,
        6,
    )
    assert config.mean == tuple(OPENAI_DATASET_MEAN)
    tower = load_open_clip_tower(config.model_name, config.weights)
    saved = load_file(weights)
    assert all(np.array_equal(v, saved[f"visual.{k}"]) for k, v in tower.state_dict().items())
    # a store rebuilds the same architecture from the config alone (no registry, no weights file)
    rebuilt = build_classifier(config, pretrained=False).tower.state_dict()
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in tower.state_dict().items()}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["pretrain", "--backbone", "ViT-B-32", "--backbone-weights", "nowhere.safetensors"], "open_clip weights file"),
        (
            ["pretrain", "--backbone", "NoSuchNet", "--backbone-weights", "WEIGHTS"],
            "unknown open_clip model 'NoSuchNet'",
        ),
        (["pretrain", "--backbone", "ViT-B-32"], "--backbone needs --backbone-weights"),
        (["fit", "--condition", "ViT-B-32"], "--condition and --condition-weights go together"),
        (["fit", "--condition", "ViT-B-32", "--condition-weights", "nowhere.pt"], "open_clip weights file not found"),
        (["fit", "--condition-std", "1", "1", "1"], "--condition-mean/--condition-std need --condition MODEL"),
    ],
)
def test_bad_model_flags_are_one_line_errors(cct, tiny_clip, tmp_path, capsys, flags, message):
    root, _ = cct
    command, *flags = [str(tiny_clip[1]) if flag == "WEIGHTS" else flag for flag in flags]
    store = tmp_path / "store"
    assert main([command, "--data", str(root), "--store", str(store), "--profile", "smoke", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not store.exists()


def test_pretrain_on_derived_tasks_with_a_local_open_clip_tower(cct, tiny_clip, tmp_path):
    root, expected = cct
    config_file, weights = tiny_clip
    before = listing(root)
    store_root = tmp_path / "store"
    flags = ["--backbone", str(config_file), "--backbone-weights", str(weights), "--steps", "20", "--quiet"]
    assert main(["pretrain", "--data", str(root), "--store", str(store_root), "--profile", "smoke", *flags]) == 0
    assert listing(root) == before  # no tasks.json, no backgrounds/ written into the dataset
    store = Store.open(store_root)
    assert store.load_json("tasks.json")["seen"] == expected["seen"]
    for location in expected["seen"] + expected["interp"] + expected["unseen"]:
        assert store.has(f"backgrounds/{location}/day_00.png"), location
    assert store.load_json("pretrain/metrics.json")["tower_lr"] == 0.0  # a pretrained tower stays frozen
    model, config = load_backbone(store)
    saved = load_file(weights)
    assert all(np.array_equal(v, saved[f"visual.{k}"]) for k, v in model.tower.state_dict().items())


def test_pipeline_end_to_end_on_real_shaped_data(cct, tiny_clip, tmp_path):
    """`wildpdiff pipeline --profile smoke` with a local open_clip tower and a class subset in another order than the
    categories; few locations keep it short. Every zoo worker saw the parent's labels: its recorded accuracies are
    reproduced on the parent's frames."""
    root, _ = cct
    config_file, weights = tiny_clip
    tasks, classes = tmp_path / "tasks.json", tmp_path / "classes.json"
    roles = {"pretrain": [17], "seen": ["B03", "ngare nanyuki/1"], "interp": ["mid B03"], "unseen": ["pink"]}
    tasks.write_text(json.dumps(roles))
    classes.write_text(json.dumps(["lion", "zebra"]))  # zebra is id 1 and lion id 4: the kept order is not the ids'
    store_root = tmp_path / "store"
    argv = ["pipeline", "--data", str(root), "--store", str(store_root), "--profile", "smoke", "--quiet"]
    argv += ["--tasks", str(tasks), "--classes", str(classes)]
    argv += ["--backbone", str(config_file), "--backbone-weights", str(weights)]
    argv += ["--condition", str(config_file), "--condition-weights", str(weights)]
    assert main(argv) == 0
    store = Store.open(store_root)
    assert store.manifest["classes"] == ["empty", "lion", "zebra"]
    assert store.manifest["components"]["condition"]["config"]["source"] == "open_clip"
    assert store.has("condition_tower.safetensors")  # the store keeps its own copy of the condition tower
    report = store.load_json("report/report.json")
    assert [t["task"] for t in report["rq1"]["per_task"]] == ["B03", "ngare_nanyuki_1"]
    assert [t["task"] for t in report["rq2"]["per_task"]] == ["mid_B03"]
    assert [t["task"] for t in report["rq3"]["per_task"]] == ["pink"]

    parent = read_dataset(DatasetSpec(root, tasks=tasks, classes=classes))
    assert read_dataset(DatasetSpec.of_store(root, store)).categories == parent.categories  # what bench/ reads
    model, config = load_backbone(store)
    layout = LoraLayout.from_dict(store.manifest["components"]["lora"])
    results = load_zoo_results(store)
    assert sorted(results) == ["B03", "mid_B03", "ngare_nanyuki_1", "pink"]
    for location, runs in results.items():
        splits = {split: parent.load(location, split, config.image_size) for split in ("val", "test")}
        for run in runs:
            assert run["labels_sha256"] == parent.label_digest(location), location
            for checkpoint in run["checkpoints"]:
                state = store.load_tensors(checkpoint["file"])
                for split, (pixels, labels) in splits.items():
                    scored = adapter_accuracy(model, state, layout, normalize(pixels, config), labels)
                    assert abs(scored - checkpoint[f"{split}_acc"]) < 1e-6, (location, checkpoint["file"], split)

    weights.rename(weights.with_suffix(".moved"))  # the store needs neither original checkpoint
    try:
        assert main(["generate", "--store", str(store_root), "--background", str(next(root.rglob("*.jpg"))),
                     "--out", str(tmp_path / "adapter")]) == 0  # fmt: skip
    finally:
        weights.with_suffix(".moved").rename(weights)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
