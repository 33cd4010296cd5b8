import json

import numpy as np
from PIL import Image

from training.profiles import get_profile
from training.world import SEEN_RANGES, Appearance, WorldConfig, build_world, plan_locations

TINY = WorldConfig(
    n_pretrain=1, pretrain_frames=12, n_seen=4, n_interp=2, n_unseen=1,
    train_frames=4, val_frames=2, test_frames=2, backgrounds=2,
)


def test_world_is_valid_cct(smoke_world):
    coco = json.loads((smoke_world / "annotations.json").read_text())
    tasks = json.loads((smoke_world / "tasks.json").read_text())
    category_ids = {c["id"] for c in coco["categories"]}
    assert 0 in category_ids and next(c["name"] for c in coco["categories"] if c["id"] == 0) == "empty"
    image_ids = {im["id"] for im in coco["images"]}
    assert {a["image_id"] for a in coco["annotations"]} == image_ids
    assert {a["category_id"] for a in coco["annotations"]} <= category_ids
    for image in coco["images"]:
        for key in ("file_name", "location", "seq_id", "datetime", "width", "height"):
            assert key in image
    # The tasks cover every location exactly once, and every location has frames.
    roles = [loc for role in ("pretrain", "seen", "interp", "unseen") for loc in tasks[role]]
    assert sorted(roles) == sorted({im["location"] for im in coco["images"]})
    assert len(roles) == len(set(roles))
    for loc in tasks["seen"] + tasks["interp"] + tasks["unseen"]:
        assert len(list((smoke_world / "backgrounds" / loc).glob("*.png"))) == get_profile("smoke").world.backgrounds


def test_every_image_is_readable(smoke_world):
    coco = json.loads((smoke_world / "annotations.json").read_text())
    for image in coco["images"]:
        with Image.open(smoke_world / image["file_name"]) as im:
            im.load()
            assert im.size == (image["width"], image["height"])
    for path in (smoke_world / "backgrounds").rglob("*.png"):
        Image.open(path).load()


def test_world_is_deterministic(tmp_path):
    build_world(TINY, tmp_path / "a", progress=False)
    build_world(TINY, tmp_path / "b", progress=False)
    for name in ("annotations.json", "tasks.json", "world.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_interp_locations_mix_their_sources_and_unseen_leave_the_seen_family():
    locations = {loc.name: loc for loc in plan_locations(get_profile("demo").world)}
    interp = [loc for loc in locations.values() if loc.role == "interp"]
    assert {loc.sources[2] for loc in interp} == {"high", "low"}
    for loc in interp:
        a, b = (locations[name].appearance for name in loc.sources[:2])
        np.testing.assert_allclose(loc.appearance.vector(), Appearance.mix(a, b, 0.5).vector())
    seen = [loc.appearance for loc in locations.values() if loc.role == "seen"]
    assert len(seen) >= 32
    # Seen locations span every axis; each unseen one lies outside the seen range on some axis.
    matrix = np.stack([s.vector() for s in seen])
    assert (matrix.max(0) - matrix.min(0) > 0).all()
    for loc in (loc for loc in locations.values() if loc.role == "unseen"):
        a = loc.appearance
        outside = [
            abs(a.hue) > SEEN_RANGES["hue_abs"][1],
            a.blur > SEEN_RANGES["blur"][1],
            a.contrast < SEEN_RANGES["contrast"][0],
            a.ir_share > SEEN_RANGES["ir_share"][1],
        ]
        assert any(outside), loc.name


def test_the_demo_world_has_the_power_to_compare_methods():
    """>= 24 interp locations (half high-, half low-similarity pairs), >= 16 unseen: every shift at two magnitudes."""
    from training.world import UNSEEN_SHIFTS

    locations = plan_locations(get_profile("demo").world)
    interp = [loc for loc in locations if loc.role == "interp"]
    unseen = [loc for loc in locations if loc.role == "unseen"]
    assert len(interp) >= 24 and len(unseen) >= 16
    assert sorted(loc.sources[2] for loc in interp).count("high") == len(interp) // 2
    assert len({loc.sources[:2] for loc in interp}) == len(interp)  # no pair twice
    kinds = [(i % len(UNSEEN_SHIFTS), (i // len(UNSEEN_SHIFTS)) % 2) for i in range(len(unseen))]
    assert set(kinds) == {(k, m) for k in range(len(UNSEEN_SHIFTS)) for m in range(2)}
    for i, location in enumerate(unseen):  # each lies beyond the seen range on its shift's axes
        for name, (low, high) in UNSEEN_SHIFTS[i % len(UNSEEN_SHIFTS)][(i // len(UNSEEN_SHIFTS)) % 2].items():
            value = abs(location.appearance.hue) if name == "hue_abs" else getattr(location.appearance, name)
            assert low <= value <= high
