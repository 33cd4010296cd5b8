"""One request -> one adapter: the single inference path of `wildpdiff generate` and the service.

    table, threshold = load_serving_table(store), stored_ood_threshold(store) or DEFAULT_OOD_THRESHOLD
    result = infer(generator, [image], InferenceOptions(seed=0, steps=10), table=table, ood_threshold=threshold)
    result.state, result.metadata, result.method, result.policy_applied   # PEFT-key tensors, safetensors metadata

Both callers decode their images (the service from uploads with its limits, the CLI from files, both to RGB
with `to_rgb`) and write the answer their way; everything between is here, so the same frame + options + store
give the same tensors, metadata (the service adds its adapter_id) and policy on either side. `infer_batch`
answers several requests at once (the service's batches of concurrent requests) with the same bytes as `infer`
gives each alone: their DDIM draws share calls in fixed blocks (`Generator.generate_vectors`).

What is served:
1. The condition (`Generator.condition`) and its distance to the seen locations (~1 typical).
2. The method: the request's, or else the store's serving table (`SERVING_FILE`, written by `wildpdiff
   evaluate`; `ServingTable.DEFAULT` without one) for the distance's region. `METHODS`:
     generate   DDIM from noise, conditioned on the frame
     anchored   DDIM started from the knn_blend adapter noised to the table's strength (SDEdit)
     knn_blend  the k nearest seen locations' mean adapters, blended (no sampling; the seed is ignored)
     nearest    the nearest seen location's mean adapter (no sampling)
   The last three need the store's per-location mean adapters (`Generator.location_means`): asking for one
   without them is a ValueError, and a table's choice of one falls back to generate.
3. The out-of-distribution policy (distance > threshold): `reject` raises `OutOfDistribution`; `fallback` turns
   a generated answer into the nearest location's mean adapter (the all-zero adapter, i.e. the pretrained
   backbone, without means), and leaves a retrieval or anchored answer as it is; `generate` serves as chosen.
4. With unlabelled frames of the location (and no shots), the answer of 2 and 3 is the default that
   `model_store.zerolabel` may replace by a candidate (the other methods, more generated seeds, the base model)
   and adapt on the frames, as the region's zero-label setting says (chosen on val by `wildpdiff evaluate`;
   none: the frames change nothing). Policy applied: `zerolabel`.
5. With labelled shots, few-shot selection (`model_store.adapt`) decides instead of 2, 3 and 4 (reject still
   refuses).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, ImageOps

from model_store import retrieval
from model_store.adapt import FewShotConfig, FewShotResult, adapt, labels_to_indices
from model_store.generator import DEFAULT_FRAME_RULE, DEFAULT_STEPS, FRAME_RULES, Generator
from model_store.lora import unflatten
from model_store.store import Store, StoreError
from model_store.zerolabel import ZeroLabelConfig, ZeroLabelResult, zero_label

SERVING_FILE = "serving.json"
METHODS = ("generate", "anchored", "knn_blend", "nearest")
ZEROLABEL_SEEDS = 4  # generated candidates (seeds seed..seed+3) a zero-label choice may pick from
RETRIEVAL_METHODS = ("anchored", "knn_blend", "nearest")  # need `Generator.location_means`
POLICIES = ("generate", "fallback", "reject")
DEFAULT_POLICY = "fallback"
# Out-of-distribution threshold for a store without a calibrated one (`model_store.ood`); in units of the
# typical spacing of the training frames. On the smoke store fresh frames of seen locations measure 0.1-2.2
# (median 0.5), unseen locations 1.8-3.7 (median 3.3).
DEFAULT_OOD_THRESHOLD = 2.0


class OutOfDistribution(ValueError):
    """The `reject` policy refused a frame unlike every seen location."""

    def __init__(self, distance: float, threshold: float, nearest_location: str):
        super().__init__(
            f"background is out of distribution: distance {distance:.3f} > threshold {threshold:.3f} "
            f"(nearest seen location {nearest_location!r}); ask for policy generate or fallback to get an adapter"
        )
        self.distance, self.threshold, self.nearest_location = distance, threshold, nearest_location


# -----------------------------------------------------------------------------
# the serving table


@dataclass(frozen=True)
class Region:
    name: str
    max_distance: float | None  # None: unbounded (the last region)
    method: str
    locations: int | None = None  # evaluated locations that fell in the region when the table was chosen
    # With unlabelled frames (`model_store.zerolabel`): the selection margin (None: keep the default), the
    # adaptation steps, and the fewest frames they need; the default (None, 0) leaves the answer as it is.
    zerolabel_margin: float | None = None
    zerolabel_steps: int = 0
    zerolabel_min_frames: int = 1

    def zerolabel(self, frames: int, max_seconds: float) -> ZeroLabelConfig:
        """The zero-label setting for a request with `frames` unlabelled frames (off below the minimum)."""
        if frames < self.zerolabel_min_frames:
            return ZeroLabelConfig(max_seconds=max_seconds)
        return ZeroLabelConfig(self.zerolabel_margin, self.zerolabel_steps, max_seconds=max_seconds)

    def to_dict(self) -> dict:
        out = {"region": self.name, "max_distance": self.max_distance, "method": self.method}
        if self.locations is not None:
            out["locations"] = self.locations
        if self.zerolabel_margin is not None or self.zerolabel_steps:
            out["zerolabel"] = {
                "select_margin": self.zerolabel_margin,
                "steps": self.zerolabel_steps,
                "min_frames": self.zerolabel_min_frames,
            }
        return out


@dataclass(frozen=True)
class ServingTable:
    """Which method serves which region of condition distance, and the retrieval methods' settings.

    Regions are ordered: the first whose max_distance is None or >= the distance wins; the last is unbounded."""

    regions: tuple[Region, ...]
    knn_k: int = 3
    knn_weighting: str = "inverse_distance"
    anchored_strength: float = 0.5
    # DDIM steps the strength was chosen at; anchored draws never take fewer (`method_answer`). Tables written
    # before the field were all chosen at 10.
    anchored_steps: int = 10
    chosen_on: str = ""

    VERSION: ClassVar[int] = 1
    DEFAULT: ClassVar[ServingTable]  # for a store without `SERVING_FILE`: generate everywhere

    def __post_init__(self):
        if not self.regions:
            raise ValueError("a serving table needs at least one region")
        if any(r.max_distance is None for r in self.regions[:-1]) or self.regions[-1].max_distance is not None:
            raise ValueError("only the last region of a serving table is unbounded (max_distance null)")
        unknown = sorted({r.method for r in self.regions} - set(METHODS))
        if unknown:
            raise ValueError(f"unknown serving methods {unknown}: expected some of {', '.join(METHODS)}")
        if self.knn_k < 1:
            raise ValueError(f"knn_blend k must be at least 1, got {self.knn_k}")
        if self.knn_weighting not in retrieval.WEIGHTINGS:
            raise ValueError(f"unknown knn weighting {self.knn_weighting!r}: expected one of {retrieval.WEIGHTINGS}")
        if not 0.0 <= self.anchored_strength <= 1.0:
            raise ValueError(f"anchored strength must be in [0, 1], got {self.anchored_strength}")
        if self.anchored_steps < 1:
            raise ValueError(f"anchored steps must be at least 1, got {self.anchored_steps}")

    def region_for(self, distance: float) -> Region:
        return next(r for r in self.regions if r.max_distance is None or r.max_distance >= distance)

    def method_for(self, distance: float) -> tuple[str, str]:
        """A condition distance -> (region, method)."""
        region = self.region_for(distance)
        return region.name, region.method

    @classmethod
    def from_dict(cls, data: dict) -> ServingTable:
        if data.get("version") != cls.VERSION:
            raise ValueError(f"serving table version {data.get('version')!r}; this code reads version {cls.VERSION}")
        try:
            regions = tuple(
                Region(r["region"], None if r["max_distance"] is None else float(r["max_distance"]), r["method"],
                       r.get("locations"), *_zerolabel_fields(r.get("zerolabel")))
                for r in data["regions"]
            )  # fmt: skip
            return cls(
                regions,
                int(data["knn_blend"]["k"]),
                data["knn_blend"]["weighting"],
                float(data["anchored"]["strength"]),
                int(data["anchored"].get("steps", 10)),
                data.get("chosen_on", ""),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed serving table: {e!r} missing or of the wrong type") from None

    def to_dict(self) -> dict:
        return {
            "version": self.VERSION,
            "regions": [region.to_dict() for region in self.regions],
            "knn_blend": {"k": self.knn_k, "weighting": self.knn_weighting},
            "anchored": {"strength": self.anchored_strength, "steps": self.anchored_steps},
            "chosen_on": self.chosen_on,
        }


def _zerolabel_fields(data: dict | None) -> tuple[float | None, int, int]:
    """A region's "zerolabel" entry (absent in tables written before it existed) -> (margin, steps, min frames)."""
    if data is None:
        return None, 0, 1
    margin = data["select_margin"]
    return (None if margin is None else float(margin)), int(data["steps"]), int(data.get("min_frames", 1))


ServingTable.DEFAULT = ServingTable((Region("all", None, "generate"),), chosen_on="default (no serving.json)")


def load_serving_table(store: Store) -> ServingTable:
    """The store's serving table, or `ServingTable.DEFAULT` for a store evaluated before tables were written."""
    if not store.has(SERVING_FILE):
        return ServingTable.DEFAULT
    try:
        return ServingTable.from_dict(store.load_json(SERVING_FILE))
    except ValueError as e:
        raise StoreError(f"{store.path(SERVING_FILE)}: {e}") from None


def stored_ood_threshold(store: Store) -> float | None:
    """The threshold calibrated into the store by `wildpdiff fit`, if any."""
    return store.manifest["components"].get("condition", {}).get("ood_threshold")


# -----------------------------------------------------------------------------
# a request and its answer


def to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded Pillow image -> RGB, EXIF orientation applied: what both sides hand to `infer`."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit greyscale: Pillow's convert would clip at 255 (a white picture); scale instead.
        values = np.asarray(image).astype(np.int64).clip(0, 65535) >> 8
        image = Image.fromarray(values.astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the route Pillow recommends for palette transparency
    return image.convert("RGB")


@dataclass(frozen=True, eq=False)
class InferenceOptions:
    """Everything besides the frames and the store that decides the answer."""

    seed: int = 0
    steps: int = DEFAULT_STEPS
    frame_rule: str = DEFAULT_FRAME_RULE
    policy: str = DEFAULT_POLICY
    method: str | None = None  # None: the serving table's choice for the condition's region
    shots: torch.Tensor | None = None  # (S, 3, H, W) normalised labelled frames of the location (few-shot)
    labels: tuple[str, ...] = ()  # one class name per shot
    refine_steps: int = 0
    candidates: int = 16  # generated few-shot candidates
    frames: torch.Tensor | None = None  # (N, 3, H, W) normalised UNLABELLED frames of the location (zero-label)
    zerolabel: ZeroLabelConfig | None = None  # None: the serving table's setting for the condition's region
    zerolabel_seconds: float = 3.0  # bound on one adaptation under the table's setting

    def __post_init__(self):
        if self.frame_rule not in FRAME_RULES:
            raise ValueError(f"unknown frame rule {self.frame_rule!r}: expected one of {', '.join(FRAME_RULES)}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}: expected one of {', '.join(POLICIES)}")
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")


@dataclass
class Inference:
    vector: torch.Tensor  # (P,) flat adapter, `Generator.shapes` order
    state: dict[str, torch.Tensor]  # the same, as contiguous PEFT-key tensors
    metadata: dict[str, str]  # safetensors __metadata__ (str -> str)
    method: str  # what served: one of METHODS, "base" (fallback without means) or "fewshot"
    region: str  # the serving table's region of the distance
    policy_applied: str  # generate (served as chosen) | fallback-nearest | fallback-base | zerolabel | fewshot
    distance: float  # condition distance (~1 typical of the training frames)
    in_distribution: bool  # distance <= the threshold
    nearest_location: str
    fewshot: FewShotResult | None = None
    zerolabel: ZeroLabelResult | None = None


def check_method(generator: Generator, method: str | None) -> None:
    """ValueError when `method` needs the per-location mean adapters and the generator has none."""
    if method in RETRIEVAL_METHODS and generator.location_means is None:
        raise ValueError(
            f"method {method} needs the seen locations' mean adapters, which this store does not hold "
            f"(fitted before they were stored); use method generate or fit the store again"
        )


def infer(
    generator: Generator,
    images: Sequence[Image.Image],
    options: InferenceOptions = InferenceOptions(),
    *,
    table: ServingTable = ServingTable.DEFAULT,
    ood_threshold: float = DEFAULT_OOD_THRESHOLD,
) -> Inference:
    """Background frames of ONE location (RGB) -> the adapter to serve (module docstring).

    Raises `OutOfDistribution` (policy reject) and ValueError for options this store cannot serve."""
    [answer] = infer_batch(generator, [(images, options)], table=table, ood_threshold=ood_threshold)
    if isinstance(answer, Exception):
        raise answer
    return answer


def infer_batch(
    generator: Generator,
    requests: Sequence[tuple[Sequence[Image.Image], InferenceOptions]],
    *,
    table: ServingTable = ServingTable.DEFAULT,
    ood_threshold: float = DEFAULT_OOD_THRESHOLD,
) -> list[Inference | Exception]:
    """Several requests (background frames, options) at once, as `infer` answers each: their DDIM draws share
    batched calls (`draw`), which give every row the bytes it gets alone. A request's error is returned in its
    place and never touches the others'."""
    plans: list[Plan | Exception] = []
    for images, options in requests:
        try:
            plans.append(plan(generator, images, options, table, ood_threshold))
        except Exception as e:  # noqa: BLE001 - the request's own answer; the batch goes on
            plans.append(e)
    pending = [p for p in plans if isinstance(p, Plan) and isinstance(p.answer, Draw)]
    try:
        for p, vector in zip(pending, draw(generator, [p.answer for p in pending]), strict=True):
            p.answer = vector
    except Exception as e:  # noqa: BLE001 - a failed shared call fails each request that needed it
        plans = [e if p in pending else p for p in plans]
    answers: list[Inference | Exception] = []
    for p in plans:
        try:
            answers.append(p if isinstance(p, Exception) else finish(generator, p, table))
        except Exception as e:  # noqa: BLE001
            answers.append(e)
    return answers


@dataclass(frozen=True)
class Draw:
    """One adapter by DDIM: a (1, D) condition and a seed, from noise or from an (P,) anchor at `strength`."""

    condition: torch.Tensor
    seed: int
    steps: int
    anchor: torch.Tensor | None = None
    strength: float = 1.0


def draw(generator: Generator, draws: Sequence[Draw]) -> list[torch.Tensor]:
    """Draws -> their (P,) adapters; one `generate_vectors` call per kind (steps, from noise or anchored at a
    strength), whatever the number of draws."""
    vectors: list[torch.Tensor | None] = [None] * len(draws)
    kinds: dict[tuple, list[int]] = {}
    for i, d in enumerate(draws):
        kinds.setdefault((d.steps, d.anchor is None, d.strength), []).append(i)
    for (steps, from_noise, strength), rows in kinds.items():
        features = torch.cat([draws[i].condition for i in rows])  # (B, D)
        anchor = None if from_noise else torch.stack([draws[i].anchor for i in rows])  # (B, P)
        with torch.inference_mode():
            out = generator.generate_vectors(features, [draws[i].seed for i in rows], steps, anchor, strength)
        for i, vector in zip(rows, out, strict=True):
            vectors[i] = vector
    return vectors


@dataclass(eq=False)  # compared by identity: its fields hold tensors
class Plan:
    """A request once its condition and method are known: `answer` is the adapter, or the DDIM draw that gives
    it (`infer_batch` draws those of many requests together)."""

    options: InferenceOptions
    condition: torch.Tensor  # (1, D)
    labels: list[int] | None  # few-shot labels as class indices
    answer: torch.Tensor | Draw | None  # None: few-shot selection decides (`finish`)
    method: str
    region: str
    policy_applied: str
    distance: float
    in_distribution: bool
    nearest_location: str
    metadata: dict[str, str]


def plan(
    generator: Generator,
    images: Sequence[Image.Image],
    options: InferenceOptions,
    table: ServingTable,
    ood_threshold: float,
) -> Plan:
    """Steps 1-3 of the module docstring; with shots, the answer is left to `finish`."""
    g = generator
    check_method(g, options.method)
    num_train_timesteps = g.scheduler_config["num_train_timesteps"]
    if options.steps > num_train_timesteps:
        raise ValueError(f"steps: at most {num_train_timesteps} for this store (its scheduler's timesteps)")
    labels = None
    if options.shots is not None or options.labels:
        labels = labels_to_indices(list(options.labels), g.classes, 0 if options.shots is None else len(options.shots))

    with torch.inference_mode():
        condition, distance = g.condition(g.embed(images), options.frame_rule)  # (1, D)
    [nearest_location] = g.nearest_location(condition)
    in_distribution = distance <= ood_threshold
    if not in_distribution and options.policy == "reject":
        raise OutOfDistribution(distance, ood_threshold, nearest_location)
    region, method = table.method_for(distance)
    if options.method is not None:
        method = options.method
    elif method in RETRIEVAL_METHODS and g.location_means is None:
        method = "generate"

    metadata = {
        **g.metadata(options.seed, options.steps, distance),
        "nearest_location": nearest_location,
        "background_frames": str(len(images)),
        "frame_rule": options.frame_rule,
        "region": region,
    }
    applied = "generate"
    if options.shots is not None:
        # The shots choose among generated, nearest-location and base adapters: they decide, not the policy.
        answer, method, applied = None, "fewshot", "fewshot"
    elif method == "generate" and not in_distribution and options.policy == "fallback":
        if g.location_means is not None:
            answer = g.location_means[g.locations.index(nearest_location)]
            method, applied = "nearest", "fallback-nearest"
        else:
            answer, method, applied = torch.zeros(g.vae.num_params), "base", "fallback-base"
    else:
        answer = method_answer(g, condition, method, options.seed, options.steps, table)
        if isinstance(answer, Draw):
            metadata["steps"] = str(answer.steps)  # anchored: at least the table's steps
    return Plan(options, condition, labels, answer, method, region, applied, distance, in_distribution,
                nearest_location, metadata)  # fmt: skip


def finish(generator: Generator, plan: Plan, table: ServingTable) -> Inference:
    """Steps 4 and 5 of the module docstring on a plan whose draw is done -> the answer."""
    g, options, metadata = generator, plan.options, dict(plan.metadata)
    vector, method, applied = plan.answer, plan.method, plan.policy_applied
    fewshot = zerolabel = None
    if options.shots is not None:
        config = FewShotConfig(options.candidates, options.refine_steps)
        fewshot = adapt(
            g, plan.condition.clone(), options.shots, plan.labels, seed=options.seed, steps=options.steps,
            fallback=g.location_means, config=config,
        )  # fmt: skip
        vector = fewshot.vector
        metadata.update(fewshot.metadata(), refine_steps=str(options.refine_steps))
    elif options.frames is not None:
        frames = len(options.frames)
        config = options.zerolabel or table.region_for(plan.distance).zerolabel(frames, options.zerolabel_seconds)
        candidates = {method: vector}
        if config.select_margin is not None:
            candidates.update(
                zerolabel_candidates(g, plan.condition, options.seed, options.steps, table, exclude=method)
            )
        zerolabel = zero_label(g, candidates, options.frames, config)
        vector, applied = zerolabel.vector, "zerolabel"
        method = "generate" if zerolabel.source.startswith("generated:") else zerolabel.source
        metadata.update(zerolabel.metadata())
    metadata.update(method=method, policy_applied=applied)
    state = {key: tensor.contiguous() for key, tensor in unflatten(vector, g.shapes).items()}
    return Inference(vector, state, metadata, method, plan.region, applied, plan.distance, plan.in_distribution,
                     plan.nearest_location, fewshot, zerolabel)  # fmt: skip


def zerolabel_candidates(
    generator: Generator, condition: torch.Tensor, seed: int, steps: int, table: ServingTable, exclude: str = ""
) -> dict[str, torch.Tensor]:
    """What a zero-label choice may pick instead of the default: every other method the store can serve,
    `ZEROLABEL_SEEDS` generated samples and the base model (the all-zero adapter); the draws in one call."""
    methods = [m for m in RETRIEVAL_METHODS if m != exclude] if generator.location_means is not None else []
    answers = {method: method_answer(generator, condition, method, seed, steps, table) for method in methods}
    answers.update({f"generated:{s}": Draw(condition, s, steps) for s in range(seed, seed + ZEROLABEL_SEEDS)})
    drawn = [name for name, answer in answers.items() if isinstance(answer, Draw)]
    answers.update(zip(drawn, draw(generator, [answers[name] for name in drawn]), strict=True))
    answers["base"] = torch.zeros(generator.vae.num_params)
    return answers


@torch.inference_mode()
def method_answer(
    generator: Generator, condition: torch.Tensor, method: str, seed: int, steps: int, table: ServingTable
) -> torch.Tensor | Draw:
    """(1, D) condition -> the (P,) adapter `method` gives, or the `Draw` that gives it (retrieval settings
    from `table`)."""
    if method == "generate":
        return Draw(condition, seed, steps)
    check_method(generator, method)
    distances = generator.location_distances(condition)[0]  # (L,)
    if method == "nearest":
        return retrieval.nearest(generator.location_means, distances)
    blend = retrieval.knn_blend(generator.location_means, distances, table.knn_k, table.knn_weighting)  # (P,)
    if method == "knn_blend":
        return blend
    # Fewer steps than the strength was chosen at may leave no timestep below strength x T: the blend itself.
    return Draw(condition, seed, max(steps, table.anchored_steps), blend, table.anchored_strength)

