import json
import shutil

import pytest

from training.cli import main
from training.data import DataError, read_cct


@pytest.fixture()
def world_copy(smoke_world, tmp_path):
    """A writable copy of the smoke world's metadata; images are linked, not copied."""
    root = tmp_path / "world"
    root.mkdir()
    for name in ("annotations.json", "tasks.json"):
        shutil.copy(smoke_world / name, root / name)
    (root / "images").symlink_to(smoke_world / "images")
    (root / "backgrounds").symlink_to(smoke_world / "backgrounds")
    return root


def _edit(root, name, change):
    data = json.loads((root / name).read_text())
    change(data)
    (root / name).write_text(json.dumps(data))


def test_reads_the_smoke_world(smoke_world):
    dataset = read_cct(smoke_world)
    assert dataset.categories[0] == "empty"
    location = dataset.locations("seen")[0]
    pixels, labels = dataset.load(location, "train", 32)
    assert pixels.shape == (len(labels), 3, 32, 32) and pixels.dtype.is_floating_point is False
    assert {f.split for f in dataset.frames[location]} == {"train", "val", "test"}


def test_missing_annotations_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="annotations.json not found"):
        read_cct(tmp_path)


def test_unknown_category_ids_are_named(world_copy):
    _edit(world_copy, "annotations.json", lambda d: d["annotations"][0].update(category_id=99))
    with pytest.raises(DataError, match=r"unknown category ids: 99 \(1x\)"):
        read_cct(world_copy)


def test_location_without_frames_is_named(world_copy):
    _edit(world_copy, "tasks.json", lambda d: d["seen"].append("NOWHERE"))
    with pytest.raises(DataError, match="'NOWHERE'.*no usable frames"):
        read_cct(world_copy)


def test_missing_and_corrupt_images_are_skipped_and_counted(world_copy, smoke_world):
    coco = json.loads((world_copy / "annotations.json").read_text())
    location = coco["images"][-1]["location"]
    corrupt = world_copy / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    truncated = world_copy / "truncated.png"
    truncated.write_bytes((smoke_world / coco["images"][-2]["file_name"]).read_bytes()[:60])
    coco["images"][-1]["file_name"] = "corrupt.png"
    coco["images"][-2]["file_name"] = "truncated.png"
    coco["images"][-2]["location"] = location
    coco["images"][-3]["file_name"] = "images/gone.png"
    (world_copy / "annotations.json").write_text(json.dumps(coco))

    dataset = read_cct(world_copy)
    assert dataset.missing == 1
    pixels, labels = dataset.load(location, None, 32)
    assert dataset.unreadable[location] == 2
    assert len(pixels) == len(labels) == len(dataset.frames[location]) - 2
    assert "skipped 3" in dataset.summary()


def test_most_files_missing_stops_with_the_folder_and_count(world_copy):
    def rename(coco):
        for image in coco["images"][: len(coco["images"]) * 3 // 5]:
            image["file_name"] = image["file_name"].replace(".png", "-gone.png")  # in folders that exist

    _edit(world_copy, "annotations.json", rename)
    listed = len(json.loads((world_copy / "annotations.json").read_text())["images"])
    with pytest.raises(DataError, match=rf"{listed * 3 // 5} of {listed} listed image files are missing under "):
        read_cct(world_copy)


def test_files_in_folders_that_are_absent_are_skipped(world_copy):
    """Metadata of more seasons than were downloaded: their frames are missing, the rest is read."""

    def add_season(coco):
        images = [dict(image, id=f"S2-{image['id']}", file_name=f"S2/{image['file_name']}") for image in coco["images"]]
        coco["annotations"] += [
            dict(a, id=f"S2-{a['id']}", image_id=f"S2-{a['image_id']}") for a in coco["annotations"]
        ]
        coco["images"] += images

    listed = len(json.loads((world_copy / "annotations.json").read_text())["images"])
    _edit(world_copy, "annotations.json", add_season)
    dataset = read_cct(world_copy)
    assert dataset.missing == listed and sum(len(v) for v in dataset.frames.values()) == listed


def test_cli_reports_bad_data_without_traceback(tmp_path, capsys):
    assert main(["pretrain", "--data", str(tmp_path), "--store", str(tmp_path / "s"), "--profile", "smoke"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: annotations.json not found") and "Traceback" not in err
