"""A small camera-trap set in the shape real CCT data comes in, and a tiny open_clip model saved to a local file.

`build_cct(root)` writes JPEGs of several sizes (one location mixes two cameras) under `images/`, with
`file_name`s relative to that folder as LILA ships them; string and integer ids and locations (some with
characters that cannot name a folder); many categories listed out of id order, most without frames, and
an empty class called "Blank" with id 7 and no category 0; labels given once per sequence, night frames,
and one image each that is flagged corrupt, missing on disk, truncated, or without a label. No
tasks.json, no backgrounds/. It returns what a reader should find.

Ten locations are big enough to get a role; they are ranked by their number of animal frames (30, 29,
..., 21), so the dealing pattern makes ranks 0, 1, 3, 5, 6, 8 seen, 2 and 7 pretrain, 4 and 9 held out.
Rank 4's scene is the pixel average of ranks 0 and 1 (an interp location); rank 9 is magenta, far from
every other (unseen). A small location with 5 animal frames is pretrain only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

FRAMELESS = {  # categories that no frame is labelled with
    3: "hyena",
    5: "impala",
    6: "warthog",
    8: "topi",
    9: "eland",
    10: "buffalo",
    11: "giraffe",
    12: "ostrich",
    13: "baboon",
    14: "cheetah",
    15: "hartebeest",
    16: "wildebeest",
    17: "elephant",
}
CATEGORIES = [  # listed out of id order, as the reader must not rely on it
    {"id": 4, "name": "lion"},
    *({"id": k, "name": name} for k, name in sorted(FRAMELESS.items(), reverse=True)),
    {"id": 7, "name": "Blank"},
    {"id": 2, "name": "gazelle"},
    {"id": 1, "name": "zebra"},
]
CLASSES = ["empty", *(name for _, name in sorted({1: "zebra", 2: "gazelle", 4: "lion", **FRAMELESS}.items()))]
COLOURS = {1: (250, 250, 250), 2: (150, 90, 40), 4: (230, 190, 60)}  # category id -> animal colour
SIZES = [(64, 48), (80, 60), (48, 48)]  # (width, height) per location, cycled
RAW_LOCATIONS = ["ngare nanyuki/1", "B03", 17, "B05", "mid B03", "K11", "L12", 9, "M14", "pink"]
EMPTY_FRAMES = 8

TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 6, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def scene(rank: int, size: tuple[int, int]) -> np.ndarray:
    """A location's fixed scene: sky and ground colours with a horizon, (H, W, 3) float."""
    if rank == 4:  # between ranks 0 and 1
        return (scene(0, size) + scene(1, size)) / 2
    width, height = size
    rng = np.random.default_rng(rank)
    sky, ground = rng.uniform(60, 200, 3), rng.uniform(40, 160, 3)
    if rank == 9:
        sky, ground = np.array([255.0, 0, 255]), np.array([200.0, 0, 220])
    horizon = int(height * (0.3 + 0.1 * (rank % 3)))
    image = np.empty((height, width, 3))
    image[:horizon], image[horizon:] = sky, ground
    image[horizon:, : width // 4] *= 0.6  # a fixed rock
    return image


def frame(rank: int, size: tuple[int, int], category: int | None, rng: np.random.Generator) -> Image.Image:
    pixels = scene(rank, size) + rng.normal(0, 6, (size[1], size[0], 3))
    if category is not None:
        x, y = rng.integers(0, size[0] // 2), rng.integers(size[1] // 3, size[1] // 2)
        pixels[y : y + size[1] // 3, x : x + size[0] // 3] = COLOURS[category]
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def build_cct(root: Path) -> dict:
    root = Path(root)
    rng = np.random.default_rng(0)
    images, annotations = [], []

    def add(location, rank, index, size, category, *, hour=12, seq=None, annotate=True, **extra) -> dict:
        image_id = index if rank % 2 == 0 else f"img-{index}"  # integer and string ids
        file_name = f"{rank}/{index:04d}.jpg"  # relative to images/
        (root / "images" / file_name).parent.mkdir(parents=True, exist_ok=True)
        frame(rank, size, None if category == 7 else category, rng).save(root / "images" / file_name, quality=90)
        image = {
            "id": image_id,
            "file_name": file_name,
            "location": location,
            "seq_id": seq or f"s{index}",
            "datetime": f"2012-03-{1 + index % 28:02d} {hour:02d}:15:00",
            "width": size[0],
            "height": size[1],
            **extra,
        }
        images.append(image)
        if annotate:
            annotations.append({"id": f"a{index}", "image_id": image_id, "category_id": category})
        return image

    index = 0
    for rank, location in enumerate([*RAW_LOCATIONS, "tiny"]):
        size = SIZES[rank % len(SIZES)]
        animals = 5 if location == "tiny" else 30 - rank
        for k in range(animals):
            # sequences of three: only the first frame carries the (sequence-level) label
            category = [1, 2, 4][(k // 3) % 3]
            seq = f"{location}-seq{k // 3}"
            labelled_here = k % 3 == 0 and k != 3  # sequence 1 is labelled through its seq_id only
            add(location, rank, index, size, category, seq=seq, annotate=labelled_here)
            if labelled_here:
                annotations[-1]["sequence_level_annotation"] = True
            if k == 3:
                annotations.append({"id": f"seq-{seq}", "seq_id": seq, "category_id": category})
            index += 1
        for k in range(2 if location == "tiny" else EMPTY_FRAMES):
            camera = (96, 72) if rank == 3 and k % 2 else size  # location rank 3 mixes two cameras
            add(location, rank, index, camera, 7, hour=2 if rank == 0 and k < 4 else 12)
            index += 1

    # one each: flagged corrupt, missing on disk, truncated on disk, without a label
    add("B03", 1, index, SIZES[1], 1, corrupt=True)
    add("B03", 1, index + 1, SIZES[1], 1)
    (root / "images" / images[-1]["file_name"]).unlink()
    add("B03", 1, index + 2, SIZES[1], 2)
    data = (root / "images" / images[-1]["file_name"]).read_bytes()
    (root / "images" / images[-1]["file_name"]).write_bytes(data[: len(data) // 3])
    add("B03", 1, index + 3, SIZES[1], 2, annotate=False)

    coco = {"info": {"version": "1", "description": "test set"}, "images": images, "annotations": annotations}
    (root / "annotations.json").write_text(json.dumps({**coco, "categories": CATEGORIES}))
    names = ["ngare_nanyuki_1", "B03", "17", "B05", "mid_B03", "K11", "L12", "9", "M14", "pink"]
    return {
        "locations": [*names, "tiny"],
        "seen": sorted(names[i] for i in (0, 1, 3, 5, 6, 8)),
        "pretrain": sorted([names[2], names[7], "tiny"]),
        "interp": [names[4]],
        "interp_sources": names[:2],
        "unseen": [names[9]],
        "truncated_at": "B03",
    }


def save_tiny_open_clip(folder: Path) -> tuple[Path, Path]:
    """An open_clip model config (.json) and a randomly initialised checkpoint of it (.safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    config = Path(folder) / "wpd-tiny-vit.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config)
    model = open_clip.create_model("wpd-tiny-vit")
    weights = Path(folder) / "wpd-tiny-vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    return config, weights
