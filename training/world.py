"""The synthetic camera-trap world: `wildpdiff world --profile demo --out data/demo`.

No real camera-trap data can be downloaded here, so the default pipeline runs on a procedural world
written in the COCO Camera Traps layout (docs/design.md, data). It is built to make the paper's three
research questions meaningful:

- a location is a vector of continuous appearance parameters (`Appearance`): colour cast (hue
  rotation), saturation, illumination, contrast, night-infrared share, blur, sensor noise, ground
  palette and texture, horizon, fixed occluders, animal scale and a class prior;
- the same location transform is applied to background and animal, so an empty frame carries what
  the adapter needs to know;
- species differ in hue, pattern and shape, with confusable pairs: a hue rotation of the location
  moves one species' colour towards another's (red/green/blue), blur and distance erase stripes vs
  spots, infrared removes colour;
- `seen` locations cover every axis densely; `interp` locations average two seen locations'
  parameters (near pairs and far pairs); `unseen` locations push one axis beyond the seen range;
- `pretrain` locations draw a new random scene for every frame with only a mild cast, so the backbone
  learns the animals without memorising backgrounds.
"""

from __future__ import annotations

import colorsys
import json
import math
import multiprocessing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

# Species look: (hue in degrees, pattern, shape). Hue 0/120/240 are one hue rotation of 120 degrees
# apart, so a location's colour cast pushes one towards the next.
SPECIES = {
    "red_plain": (0.0, "plain", "wide"),
    "green_plain": (120.0, "plain", "wide"),
    "blue_plain": (240.0, "plain", "wide"),
    "yellow_striped": (55.0, "stripes", "wide"),
    "yellow_spotted": (55.0, "spots", "wide"),
    "tall_magenta": (300.0, "plain", "tall"),
}
# Extra species for the paper profile (19 classes, as in Snapshot Serengeti's subset).
EXTRA_SPECIES = {
    f"{name}_{pattern}": (hue, pattern, shape)
    for name, hue in (("orange", 30.0), ("teal", 180.0), ("violet", 270.0))
    for pattern, shape in (("plain", "tall"), ("stripes", "wide"), ("spots", "tall"), ("plain", "wide"))
}


@dataclass
class Appearance:
    """A location's appearance; every field is continuous so locations can be interpolated."""

    hue: float = 0.0  # colour-cast hue rotation in degrees
    saturation: float = 1.0  # colour saturation multiplier
    brightness: float = 1.0  # illumination gain
    contrast: float = 1.0  # contrast around mid-grey
    ir_share: float = 0.1  # share of night-infrared (greyscale) frames
    blur: float = 0.0  # Gaussian blur radius in pixels (at 32 px)
    noise: float = 0.02  # sensor noise std (0-1 scale)
    ground: float = 0.5  # ground palette: 0 = dry sand, 1 = lush grass
    texture: float = 0.5  # ground texture amplitude
    horizon: float = 0.4  # horizon height as a fraction of the image
    occluders: float = 1.0  # number of fixed rocks / trunks (rounded)
    scale: float = 1.0  # animal size multiplier (distance to the camera)
    empty_share: float = 0.3  # share of empty frames

    def vector(self) -> np.ndarray:
        return np.array([getattr(self, f.name) for f in fields(self)], dtype=np.float64)

    @classmethod
    def mix(cls, a: Appearance, b: Appearance, weight: float) -> Appearance:
        va, vb = a.vector(), b.vector()
        return cls(*((1 - weight) * va + weight * vb).tolist())


# Ranges of the seen family; unseen locations step outside one of them. The hue magnitude is kept
# away from 0 so that every seen location is a real domain shift for the pretrained backbone.
SEEN_RANGES = {
    "hue_abs": (15.0, 50.0),
    "saturation": (0.55, 1.15),
    "brightness": (0.6, 1.3),
    "contrast": (0.55, 1.2),
    "ir_share": (0.0, 0.25),
    "blur": (0.0, 0.7),
    "noise": (0.01, 0.05),
    "ground": (0.0, 1.0),
    "texture": (0.1, 0.9),
    "horizon": (0.25, 0.45),
    "occluders": (0.0, 3.0),
    "scale": (0.8, 1.3),
    "empty_share": (0.15, 0.4),
}
# What an unseen location does beyond the seen family: four kinds of shift, each at a mild and a strong
# magnitude; location i takes kind i % 4 at magnitude (i // 4) % 2.
UNSEEN_SHIFTS = (
    ({"hue_abs": (58.0, 66.0)}, {"hue_abs": (75.0, 90.0)}),
    ({"blur": (1.0, 1.3), "saturation": (0.42, 0.5)}, {"blur": (1.6, 2.0), "saturation": (0.3, 0.4)}),
    ({"contrast": (0.42, 0.5), "brightness": (1.35, 1.45)}, {"contrast": (0.3, 0.4), "brightness": (1.5, 1.7)}),
    ({"ir_share": (0.45, 0.6), "noise": (0.055, 0.065)}, {"ir_share": (0.7, 0.9), "noise": (0.06, 0.08)}),
)


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    image_size: int = 32
    n_pretrain: int = 8  # pretrain locations, each frame a fresh random scene
    pretrain_frames: int = 1200  # frames per pretrain location
    n_seen: int = 40
    n_interp: int = 24  # half near pairs, half far pairs
    n_unseen: int = 16  # every kind of shift at two magnitudes (UNSEEN_SHIFTS)
    train_frames: int = 256  # per seen / interp / unseen location
    val_frames: int = 96
    test_frames: int = 192
    backgrounds: int = 20  # empty frames per location under backgrounds/<location>/
    pretrain_hue: float = 10.0  # max |hue| of pretrain scenes
    species: list[str] = field(default_factory=lambda: list(SPECIES))


# ---------------------------------------------------------------------------------------------------
# sampling locations


def _uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(*lo_hi))


def severity(a: Appearance) -> float:
    """Roughly the accuracy the pretrained backbone loses at this location: the drop per unit of each shift,
    fitted by linear regression on a demo run (R^2 0.71 over 40 seen locations)."""
    return (
        0.0074 * abs(a.hue)
        + 0.6 * a.ir_share
        + 2.3 * a.noise
        + 0.17 * max(0.0, 1.0 - a.brightness)
        + 0.58 * max(0.0, a.horizon - 0.25)
    )


# Seen locations are kept inside a severity band, so each one is a real domain shift that a LoRA can
# close (pretrained accuracy about 0.73-0.87), while their directions spread over every axis.
SEEN_SEVERITY = (0.40, 0.54)


def sample_seen(rng: np.random.Generator, ranges: dict = SEEN_RANGES, band: tuple | None = SEEN_SEVERITY) -> Appearance:
    while True:
        values = {name: _uniform(rng, span) for name, span in ranges.items() if name != "hue_abs"}
        values["hue"] = _uniform(rng, ranges["hue_abs"]) * float(rng.choice([-1.0, 1.0]))
        appearance = Appearance(**values)
        if band is None or band[0] <= severity(appearance) <= band[1]:
            return appearance


def sample_pretrain_scene(rng: np.random.Generator, max_hue: float) -> Appearance:
    """A random scene with a mild cast: the backbone sees all palettes, but not strong shifts."""
    scene = sample_seen(rng, band=None)
    return replace(
        scene,
        hue=float(rng.uniform(-max_hue, max_hue)),
        saturation=float(rng.uniform(0.9, 1.1)),
        brightness=float(rng.uniform(0.85, 1.15)),
        contrast=float(rng.uniform(0.85, 1.15)),
        ir_share=0.1,
        blur=float(rng.uniform(0.0, 0.3)),
        noise=float(rng.uniform(0.01, 0.03)),
        scale=float(rng.uniform(0.85, 1.3)),
    )


def sample_unseen(rng: np.random.Generator, index: int) -> Appearance:
    kind = UNSEEN_SHIFTS[index % len(UNSEEN_SHIFTS)]
    ranges = dict(SEEN_RANGES)
    ranges.update(kind[(index // len(UNSEEN_SHIFTS)) % len(kind)])
    return sample_seen(rng, ranges, band=None)


def _normalised(appearances: list[Appearance]) -> np.ndarray:
    matrix = np.stack([a.vector() for a in appearances])
    return (matrix - matrix.mean(0)) / (matrix.std(0) + 1e-8)


def interp_pairs(seen: list[Appearance], n_pairs: int, rng: np.random.Generator) -> list[tuple[int, int, str]]:
    """Half near pairs (high similarity), half far pairs (low similarity).

    Pairs with opposite colour casts are skipped: their midpoint is a neutral location that the
    pretrained backbone already solves, which would make interpolation look easy. A seen location joins at
    most `ceil(2 n_pairs / n_seen)` pairs, so many pairs spread over the whole seen family.
    """
    points = _normalised(seen)
    dist = np.linalg.norm(points[:, None] - points[None], axis=-1)
    candidates = [
        (float(dist[i, j]), i, j)
        for i in range(len(seen))
        for j in range(i + 1, len(seen))
        if seen[i].hue * seen[j].hue > 0
    ]
    candidates.sort()
    n_near = (n_pairs + 1) // 2
    chosen: list[tuple[int, int, str]] = []
    uses = np.zeros(len(seen), dtype=int)
    cap = max(1, -(-2 * n_pairs // len(seen)))
    for similarity, pool in (("high", candidates), ("low", candidates[::-1])):
        quota = n_near if similarity == "high" else n_pairs - n_near
        for _, i, j in pool:
            if quota == 0:
                break
            if uses[i] >= cap or uses[j] >= cap or (i, j, "high") in chosen:
                continue
            chosen.append((i, j, similarity))
            uses[[i, j]] += 1
            quota -= 1
    return chosen


# ---------------------------------------------------------------------------------------------------
# rendering (numpy at 2x resolution, then downsampled with Pillow for anti-aliasing)


def _hue_rotation(degrees: float) -> np.ndarray:
    """3x3 RGB matrix rotating hue around the grey axis."""
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    k = (1 - c) / 3
    r = math.sqrt(1 / 3) * s
    return np.array([[c + k, k - r, k + r], [k + r, c + k, k - r], [k - r, k + r, c + k]])


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((hue % 360) / 360, saturation, value))


@dataclass
class Layout:
    """The fixed geometry of a location: vegetation and occluders never move between frames."""

    ground_rgb: np.ndarray
    sky_rgb: np.ndarray
    texture_phase: np.ndarray  # (2,) phases of the ground texture
    occluders: list[tuple[str, float, float, float]]  # (kind, x, y, size), fractions of the image
    grass: list[tuple[float, float, float]]  # (x, height, shade)


def make_layout(appearance: Appearance, rng: np.random.Generator) -> Layout:
    sand, grass = np.array([0.72, 0.62, 0.42]), np.array([0.36, 0.55, 0.25])
    ground_rgb = (1 - appearance.ground) * sand + appearance.ground * grass + rng.normal(0, 0.03, 3)
    sky_rgb = np.array([0.55, 0.7, 0.9]) + rng.normal(0, 0.04, 3)
    occluders = []
    for _ in range(int(round(appearance.occluders))):
        kind = str(rng.choice(["rock", "trunk"]))
        occluders.append(
            (kind, float(rng.uniform(0.05, 0.95)), float(rng.uniform(0.0, 1.0)), float(rng.uniform(0.6, 1.2)))
        )
    grass_tufts = [
        (float(rng.uniform(0, 1)), float(rng.uniform(0.04, 0.12)), float(rng.uniform(0.6, 1.0))) for _ in range(6)
    ]
    return Layout(ground_rgb, sky_rgb, rng.uniform(0, 2 * np.pi, 2), occluders, grass_tufts)


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def _draw_scene(canvas: np.ndarray, appearance: Appearance, layout: Layout, rng: np.random.Generator) -> None:
    size = canvas.shape[0]
    yy, xx = np.mgrid[0:size, 0:size] / size
    horizon = appearance.horizon
    sky = yy < horizon
    canvas[sky] = layout.sky_rgb * (0.85 + 0.3 * yy[sky, None] / max(horizon, 1e-3))
    ripple = np.sin(xx * 23 + layout.texture_phase[0]) * np.sin(yy * 31 + layout.texture_phase[1])
    speckle = rng.normal(0, 0.5, (size, size))
    shade = 1 + appearance.texture * 0.25 * (ripple + 0.4 * speckle)
    canvas[~sky] = (layout.ground_rgb * shade[~sky, None]).clip(0, 1)
    for x, height, tone in layout.grass:
        blade = (np.abs(xx - x) < 0.015) & (yy > horizon - height) & (yy < horizon + 0.02)
        canvas[blade] = np.array([0.25, 0.45, 0.2]) * tone
    for kind, x, y, scale in layout.occluders:
        base = horizon + y * (1 - horizon)
        if kind == "rock":
            mask = _ellipse(xx, yy, x, base, 0.09 * scale, 0.06 * scale)
            canvas[mask] = np.array([0.45, 0.43, 0.42]) * (0.9 + 0.2 * yy[mask, None])
        else:
            mask = (np.abs(xx - x) < 0.035 * scale) & (yy < base)
            canvas[mask] = np.array([0.38, 0.28, 0.2])


def _draw_animal(canvas: np.ndarray, species: str, appearance: Appearance, rng: np.random.Generator) -> None:
    size = canvas.shape[0]
    yy, xx = np.mgrid[0:size, 0:size] / size
    hue, pattern, shape = (SPECIES | EXTRA_SPECIES)[species]
    hue += rng.normal(0, 4)
    colour = _hsv(hue, rng.uniform(0.75, 0.9), rng.uniform(0.75, 0.9))
    scale = appearance.scale * rng.uniform(0.85, 1.15)
    rx, ry = (0.2, 0.11) if shape == "wide" else (0.1, 0.2)
    rx, ry = rx * scale, ry * scale
    cx = rng.uniform(0.15 + rx, 0.85 - rx)
    cy = rng.uniform(max(appearance.horizon, 0.3) + ry * 0.2, 0.8)
    legs = np.zeros_like(xx, dtype=bool)
    for offset in (-0.6, 0.6):
        legs |= (np.abs(xx - (cx + offset * rx)) < 0.02 * scale) & (yy > cy) & (yy < cy + ry + 0.08 * scale)
    body = _ellipse(xx, yy, cx, cy, rx, ry)
    head_x = cx + (rx if rng.random() < 0.5 else -rx) * 0.95
    head = _ellipse(xx, yy, head_x, cy - ry * 0.8, 0.06 * scale, 0.06 * scale)
    animal = body | head | legs
    canvas[animal] = colour
    if pattern == "stripes":
        stripes = body & (np.sin((xx - cx) / (rx + 1e-6) * 9.0) > 0.2)
        canvas[stripes] = colour * 0.3
    elif pattern == "spots":
        for _ in range(5):
            sx, sy = cx + rng.uniform(-0.7, 0.7) * rx, cy + rng.uniform(-0.6, 0.6) * ry
            canvas[body & _ellipse(xx, yy, sx, sy, 0.035 * scale, 0.035 * scale)] = colour * 0.3


def _camera(
    canvas: np.ndarray, appearance: Appearance, night: bool, image_size: int, rng: np.random.Generator
) -> Image.Image:
    """The location transform, identical for backgrounds and animals: cast, light, sensor."""
    pixels = canvas @ _hue_rotation(appearance.hue).T
    grey = pixels.mean(-1, keepdims=True)
    pixels = grey + appearance.saturation * (pixels - grey)
    gain = appearance.brightness * rng.uniform(0.85, 1.15)  # time of day
    pixels = 0.5 + appearance.contrast * (pixels * gain - 0.5)
    if night:  # infrared flash: luminance only, flat and grainy
        luminance = pixels @ np.array([0.299, 0.587, 0.114])
        luminance = 0.5 + 1.3 * (luminance - luminance.mean())
        pixels = np.repeat(luminance[..., None], 3, axis=-1)
    image = Image.fromarray((pixels.clip(0, 1) * 255).astype(np.uint8))
    image = image.resize((image_size, image_size), Image.Resampling.BOX)
    if appearance.blur > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(appearance.blur))
    # Infrared sensors are grainier and their grain is grey, not coloured.
    grain_shape = (image_size, image_size, 1) if night else (image_size, image_size, 3)
    grain = rng.normal(0, appearance.noise * (1.5 if night else 1.0), grain_shape)
    noisy = np.asarray(image, dtype=np.float32) / 255 + grain
    return Image.fromarray((noisy.clip(0, 1) * 255).astype(np.uint8))


def render(
    appearance: Appearance, layout: Layout, species: str | None, image_size: int, rng: np.random.Generator
) -> Image.Image:
    canvas = np.zeros((2 * image_size, 2 * image_size, 3))
    _draw_scene(canvas, appearance, layout, rng)
    if species is not None:
        _draw_animal(canvas, species, appearance, rng)
    night = rng.random() < appearance.ir_share
    return _camera(canvas, appearance, night, image_size, rng)


# ---------------------------------------------------------------------------------------------------
# writing the world in COCO Camera Traps layout


@dataclass
class Location:
    name: str
    role: str  # pretrain | seen | interp | unseen
    appearance: Appearance
    layout_seed: int
    sources: tuple[str, str, str] | None = None  # interp: (a, b, "high"|"low" similarity)


def plan_locations(config: WorldConfig) -> list[Location]:
    rng = np.random.default_rng(config.seed)
    locations = [
        Location(f"P{i:02d}", "pretrain", Appearance(), int(rng.integers(2**31))) for i in range(config.n_pretrain)
    ]
    seen = [Location(f"S{i:03d}", "seen", sample_seen(rng), int(rng.integers(2**31))) for i in range(config.n_seen)]
    locations += seen
    for k, (i, j, similarity) in enumerate(interp_pairs([s.appearance for s in seen], config.n_interp, rng)):
        a, b = seen[i], seen[j]
        mixed = Appearance.mix(a.appearance, b.appearance, 0.5)
        locations.append(Location(f"I{k:02d}", "interp", mixed, int(rng.integers(2**31)), (a.name, b.name, similarity)))
    locations += [
        Location(f"U{i:02d}", "unseen", sample_unseen(rng, i), int(rng.integers(2**31))) for i in range(config.n_unseen)
    ]
    return locations


def _class_prior(appearance: Appearance, n_species: int, rng: np.random.Generator) -> np.ndarray:
    animals = rng.dirichlet(np.full(n_species, 4.0)) * (1 - appearance.empty_share)
    return np.concatenate([[appearance.empty_share], animals])


def _write_location(job: tuple[WorldConfig, Path, int, Location]) -> tuple[list[dict], list[dict]]:
    """Render and write one location's frames and backgrounds; returns its CCT image/annotation records."""
    config, out, index, loc = job
    categories = ["empty", *config.species]
    rng = np.random.default_rng([config.seed, index])
    layout = make_layout(loc.appearance, np.random.default_rng(loc.layout_seed))
    prior = _class_prior(loc.appearance, len(config.species), rng)
    if loc.role == "pretrain":
        splits = ["train"] * config.pretrain_frames
    else:
        splits = ["train"] * config.train_frames + ["val"] * config.val_frames + ["test"] * config.test_frames
    (out / "images" / loc.name).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for frame, split in enumerate(splits):
        appearance, frame_layout = loc.appearance, layout
        if loc.role == "pretrain":
            appearance = sample_pretrain_scene(rng, config.pretrain_hue)
            frame_layout = make_layout(appearance, rng)
            prior = _class_prior(appearance, len(config.species), rng)
        category = int(rng.choice(len(categories), p=prior))
        species = None if category == 0 else categories[category]
        image_id = f"{loc.name}_{frame:05d}"
        file_name = f"images/{loc.name}/{image_id}.png"
        render(appearance, frame_layout, species, config.image_size, rng).save(out / file_name)
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "location": loc.name,
                "seq_id": image_id,
                "datetime": f"2026-01-01 {frame % 24:02d}:00:00",
                "width": config.image_size,
                "height": config.image_size,
                "split": split,
            }
        )
        annotations.append({"id": f"a_{image_id}", "image_id": image_id, "category_id": category})
    if loc.role != "pretrain":
        background_dir = out / "backgrounds" / loc.name
        background_dir.mkdir(parents=True, exist_ok=True)
        for k in range(config.backgrounds):
            render(loc.appearance, layout, None, config.image_size, rng).save(background_dir / f"{k:03d}.png")
    return images, annotations


def build_world(config: WorldConfig, out: Path, progress: bool = True, workers: int = 2) -> dict:
    """Write the world to `out` (annotations.json, images/, backgrounds/, tasks.json, world.json).

    Locations render in parallel; each has its own seeded generator, so the output does not depend on
    the number of workers.
    """
    out = Path(out)
    categories = ["empty", *config.species]
    locations = plan_locations(config)
    jobs = [(config, out, index, loc) for index, loc in enumerate(locations)]
    images, annotations = [], []
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        done = pool.imap(_write_location, jobs)
        for location_images, location_annotations in tqdm(
            done, total=len(jobs), desc="world", unit="location", disable=not progress
        ):
            images += location_images
            annotations += location_annotations

    _write_json(
        out / "annotations.json",
        {
            "info": {"description": "Wild-P-Diff synthetic camera-trap world", "version": "1"},
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i, "name": name} for i, name in enumerate(categories)],
        },
    )
    tasks = {
        role: [loc.name for loc in locations if loc.role == role] for role in ("pretrain", "seen", "interp", "unseen")
    }
    tasks["interp_sources"] = {loc.name: list(loc.sources) for loc in locations if loc.sources}
    _write_json(out / "tasks.json", tasks)
    _write_json(
        out / "world.json",
        {
            "config": asdict(config),
            "locations": {
                loc.name: {"role": loc.role, **asdict(loc.appearance)} for loc in locations if loc.role != "pretrain"
            },
        },
    )
    return tasks


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1))
