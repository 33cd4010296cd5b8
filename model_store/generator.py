"""`Generator`: background frame(s) -> LoRA adapter(s), the models under `model_store.inference` (which turns a
request into an answer for the CLI and the service) and the evaluation.

    generator = Generator.from_store(Store("model_store/demo"))
    [adapter] = generator.generate([Image.open("background.png")], seeds=0, steps=10)  # PEFT-key state dict

`from_store` does all the store IO and hands the parts (classifier, condition encoder, stored conditions,
VAE, denoiser, scheduler config, ...) to the constructor, so a test or benchmark can compose one without a store.

Per image: condition features (frozen tower) -> z-score with the stored statistics -> DDIM from seeded noise
in the VAE's latent space (B, C, L) -> VAE decoder -> un-z-score -> unflatten into PEFT keys.

Determinism: each sample's initial noise comes from its own `torch.Generator` seeded with its seed, and DDIM
with eta=0 adds no other randomness, so the same image + seed + steps + store gives the same tensors (and,
through `model_store.lora.adapter_bytes`, the same bytes) on the same device, whatever other rows share the
call: rows go through the models in blocks of exactly `SAMPLING_BLOCK` (CPU kernels pick their algorithm by
batch size), so the service can batch concurrent requests and still answer what the CLI writes.

`distance` is the out-of-distribution signal: the Euclidean distance of a frame's z-scored features to the
nearest stored embedding of a seen location's (training-half) background frame, divided by `distance_scale`,
the median of the same distance among the stored frames themselves (each to its nearest other frame). So ~1
means "as close to the training frames as they are to each other"; much larger means a scene unlike any seen
location, where a generated adapter can be far worse than none. `location_distances` gives the same distance
per seen location, for retrieval over `location_means` (`model_store.retrieval`).

Anchored sampling (`anchor`, `strength`) is SDEdit in the VAE's latent space: encode a given adapter (a blend of
the nearest locations' means), noise it to timestep ~strength * T with the seed's noise and run the remaining
DDIM steps, so the sample stays near a sensible adapter where the condition alone is a weak guide.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from PIL import Image
from torch import nn

from model_store import retrieval
from model_store.backbone import BACKBONE_FILE, BackboneConfig, Classifier, load_backbone
from model_store.condition import CONDITION_TOWER_FILE, CONDITIONS_FILE, ConditionConfig, ConditionEncoder, standardize
from model_store.denoiser import DENOISER_FILE, DenoiserConfig, build_denoiser
from model_store.lora import LoraLayout, adapter_shapes, unflatten
from model_store.ood import load_fallback
from model_store.store import Store, StoreError
from model_store.vae import NORMALIZATION_FILE, VAE_FILE, Normalization, ParameterVAE, VAEConfig

SCHEDULER_FILE = "scheduler/scheduler_config.json"
# DDIM steps when a caller names none. `python -m bench.steps` on demo (80 val locations x 4 seeds): every count
# from 1 to 20 ties with 10 on val (2 steps: +0.03 points [-0.41, +0.50]) at a third of the time. 1 step ties too
# (+0.35) and is faster still, but from one step every seed gives nearly the same adapter (spread 0.17 of
# 10 steps', 0.79 at 2), and few-shot and zero-label requests choose among seeds.
DEFAULT_STEPS = 2
# Rows per denoiser and VAE call (`Generator.generate_vectors`). Torch's CPU kernels pick their algorithm by
# batch size, so a row computed in a batch of 2 and in one of 64 differs in the last bits; in blocks of one
# fixed size an adapter's bytes never depend on which rows shared its call (the service batches concurrent
# requests). On demo (1 thread, 10 steps) a block of 16 costs 44 ms against 14 ms for a lone row, 51 ms for a
# block of 32 and 110 ms for 64 rows at once.
SAMPLING_BLOCK = 16
# How several background frames of one location become one condition (`Generator.condition`). Measured on
# demo (val split, 5 samples, 3 held-out frames vs 1, README "Task representation"): both rules gain ~1.4
# points on seen locations; on interp locations "closest" loses 1.7 points (it picks the frame most like one
# source location), "mean" 0.5-1.1, so "mean" is the default.
FRAME_RULES = ("mean", "closest")
DEFAULT_FRAME_RULE = "mean"
GENERATOR_FILES = (BACKBONE_FILE, CONDITIONS_FILE, NORMALIZATION_FILE, VAE_FILE, DENOISER_FILE, SCHEDULER_FILE)


def generator_files(store: Store) -> tuple[str, ...]:
    """The files a Generator reads: GENERATOR_FILES, plus the condition tower when the store has its own."""
    config = store.manifest["components"].get("condition", {}).get("config", {})
    return GENERATOR_FILES + ((CONDITION_TOWER_FILE,) if config.get("source") == "open_clip" else ())


def generator_id(store: Store) -> str:
    """16 hex digits naming the generator: a hash of its files' hashes, so reports or zoo files added to
    the store later do not change it."""
    table = {relpath: store.manifest["files"][relpath]["sha256"] for relpath in generator_files(store)}
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class StoredConditions:
    """The seen locations' stored condition features (`CONDITIONS_FILE`): the references of every distance."""

    locations: list[str]  # seen locations, in the order of the zoo and of `location_means`
    features: torch.Tensor  # (N, D) raw features of the training-half background frames
    location: torch.Tensor  # (N,) index into `locations`
    mean: torch.Tensor  # (D,) z-scoring statistics of the features
    std: torch.Tensor  # (D,)
    distance_scale: float  # median nearest-other-frame distance among the stored frames (module docstring)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], locations: Sequence[str]) -> StoredConditions:
        return cls(
            list(locations),
            tensors["features"],
            tensors["location"],
            tensors["mean"],
            tensors["std"],
            float(tensors["distance_scale"]),
        )


@dataclass(frozen=True)
class Residual:
    """A denoiser that generates the difference between an adapter's latent and the latent of the knn_blend of
    the k nearest seen locations' mean adapters (trained leave-self-out: a location never blends itself)."""

    k: int
    weighting: str

    @classmethod
    def from_component(cls, component: dict) -> Residual | None:
        """The denoiser component of a manifest -> its residual settings; None for a plain (latent) denoiser."""
        if component.get("target", "latent") == "latent":
            return None
        return cls(int(component["residual"]["k"]), component["residual"]["weighting"])


class Generator:
    classifier: Classifier
    backbone_config: BackboneConfig
    layout: LoraLayout
    shapes: dict[str, tuple[int, ...]]
    classes: list[str]
    store_id: str
    base_model_hash: str

    def __init__(
        self,
        classifier: Classifier,
        backbone_config: BackboneConfig,
        layout: LoraLayout,
        encoder: ConditionEncoder,
        conditions: StoredConditions,
        normalization: Normalization,
        vae: ParameterVAE,
        denoiser: nn.Module,
        scheduler_config: dict,
        *,
        classes: Sequence[str],
        location_means: torch.Tensor | None = None,
        residual: Residual | None = None,
        store_id: str = "",
        base_model_hash: str = "",
    ):
        """A generator from its parts, all on one device (the classifier's); `from_store` reads them from a store.

        `location_means`: (L, P) per-seen-location mean adapters for the retrieval methods, or None."""
        self.classifier = classifier
        self.device = next(classifier.parameters()).device
        self.backbone_config = backbone_config
        self.layout = layout
        self.shapes = adapter_shapes(classifier, layout)
        self.classes = list(classes)
        self.store_id = store_id
        self.base_model_hash = base_model_hash
        self.encoder = encoder

        self.locations = list(conditions.locations)
        self.condition_mean = conditions.mean.to(self.device)  # (D,)
        self.condition_std = conditions.std.to(self.device)  # (D,)
        self.references = conditions.features.to(self.device)  # (N, D) stored frames, raw features
        self.reference_locations = conditions.location.cpu()  # (N,) index into self.locations
        self.distance_scale = conditions.distance_scale
        self._standard_references = standardize(self.references, self.condition_mean, self.condition_std)

        self.normalization = normalization
        self.vae = vae
        self.denoiser = denoiser
        self.scheduler_config = dict(scheduler_config)
        num_params = sum(torch.Size(shape).numel() for shape in self.shapes.values())
        if vae.num_params != num_params:
            raise ValueError(f"the VAE codes {vae.num_params} parameters, the LoRA layout has {num_params}")
        if location_means is not None and tuple(location_means.shape) != (len(self.locations), num_params):
            raise ValueError(
                f"location means of shape {tuple(location_means.shape)}, expected ({len(self.locations)}, {num_params})"
            )
        self.location_means = location_means  # (L, P) on CPU, or None
        if residual is not None and location_means is None:
            raise ValueError("a residual denoiser needs the per-location mean adapters it blends")
        self.residual = residual
        self.neighbours = denoiser.neighbours  # retrieved locations the denoiser sees (model_store.denoiser)
        if self.neighbours and location_means is None:
            raise ValueError("a retrieval-augmented denoiser needs the per-location mean adapters it retrieves")
        if self.neighbours > len(self.locations):
            raise ValueError(f"the denoiser sees {self.neighbours} neighbours, the store has {len(self.locations)}")
        # (L, C, L') latents of the location means, what a retrieval-augmented denoiser is shown
        with torch.no_grad():
            self.location_latents = self._anchor_latents(location_means) if self.neighbours else None

    @classmethod
    def from_store(cls, store: Store, device: str | torch.device = "cpu") -> Generator:
        """Every part read through the store (hashes are checked) and moved to `device`."""
        missing = [relpath for relpath in generator_files(store) if not store.has(relpath)]
        if missing:
            raise StoreError(
                f"{store.path(missing[0])}: required generator file is not in the manifest "
                f"(run `wildpdiff fit` on this store first)"
            )
        components = store.manifest["components"]
        device = torch.device(device)
        classifier, backbone_config = load_backbone(store)
        classifier.to(device)
        layout = LoraLayout.from_dict(components["lora"])

        condition_config = ConditionConfig.from_dict(components["condition"]["config"])
        tower_state = store.load_tensors(CONDITION_TOWER_FILE) if condition_config.source == "open_clip" else None
        encoder = ConditionEncoder.build(classifier, backbone_config, condition_config, tower_state).to(device)
        conditions = StoredConditions.from_tensors(
            store.load_tensors(CONDITIONS_FILE), components["condition"]["locations"]
        )

        num_params = sum(torch.Size(shape).numel() for shape in adapter_shapes(classifier, layout).values())
        vae = ParameterVAE(num_params, VAEConfig.from_dict(components["vae"]["config"]))
        vae.load_state_dict(store.load_tensors(VAE_FILE))
        vae.requires_grad_(False).eval().to(device)
        denoiser = build_denoiser(
            DenoiserConfig.from_dict(components["denoiser"]["config"]), vae.latent_shape, encoder.dim
        )
        denoiser.load_state_dict(store.load_tensors(DENOISER_FILE))
        denoiser.requires_grad_(False).eval().to(device)
        return cls(
            classifier,
            backbone_config,
            layout,
            encoder,
            conditions,
            Normalization.from_tensors(store.load_tensors(NORMALIZATION_FILE)),
            vae,
            denoiser,
            store.load_json(SCHEDULER_FILE),
            classes=store.manifest["classes"],
            location_means=load_fallback(store),
            residual=Residual.from_component(components["denoiser"]),
            store_id=generator_id(store),
            base_model_hash=store.manifest["files"][BACKBONE_FILE]["sha256"],
        )

    # --- conditions

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Pillow images -> (B, D) raw condition features."""
        return self.encoder.embed(images)

    def _reference_distances(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) raw features -> (B, N) float64 distances to every stored frame, z-scored, unscaled."""
        standard = standardize(features.to(self.device), self.condition_mean, self.condition_std)
        return torch.cdist(standard.double(), self._standard_references.double())  # float64: ties resolve alike

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B,) distance to the nearest stored seen-location frame, in units of `distance_scale`
        (module docstring: ~1 is typical of training frames)."""
        return (self._reference_distances(features).min(dim=1).values.float() / self.distance_scale).cpu()

    def location_distances(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, L): per seen location (`self.locations` order), the distance of its closest stored
        frame, in the units of `distance` (whose value is the row minimum of this)."""
        distances = self._reference_distances(features)  # (B, N)
        owner = self.reference_locations.to(distances.device).expand_as(distances)
        per_location = torch.full(
            (len(distances), len(self.locations)), float("inf"), dtype=distances.dtype, device=distances.device
        ).scatter_reduce(1, owner, distances, "amin")
        return (per_location.float() / self.distance_scale).cpu()

    def condition(self, features: torch.Tensor, rule: str = DEFAULT_FRAME_RULE) -> tuple[torch.Tensor, float]:
        """(K, D) raw features of K background frames of ONE location -> the (1, D) condition and the request's
        distance: the smallest of the K frames' distances (`distance`).

        "mean": the mean of the K features; "closest": the frame nearest the seen locations' training frames
        (a night-infrared frame, which names its location less surely, usually lies farther out).
        Why the smallest frame distance, not the mean's own: a day + night pair averages to a point between
        the two, far from every stored frame. On demo, pairs of held-out frames of seen locations were flagged
        out of distribution in 20% of cases by the mean's distance against 0.5% by the smallest (unseen
        locations: 100% and 90%; single frames: 5% and 95%, as calibrated)."""
        if rule not in FRAME_RULES:
            raise ValueError(f"unknown frame rule {rule!r}: expected one of {', '.join(FRAME_RULES)}")
        if len(features) == 0:
            raise ValueError("no background frame to condition on")
        distances = self.distance(features)  # (K,)
        best = int(distances.argmin())
        condition = features.mean(0, keepdim=True) if rule == "mean" else features[best : best + 1]
        return condition, float(distances[best])

    def nearest_location(self, features: torch.Tensor) -> list[str]:
        """(B, D) -> the seen location of the nearest stored frame, per row."""
        index = self._reference_distances(features).min(dim=1).indices.cpu()
        return [self.locations[i] for i in self.reference_locations[index].tolist()]

    # --- sampling

    def _anchor_latents(self, anchor: torch.Tensor) -> torch.Tensor:
        """(B, P) flat adapters -> (B, C, L) their VAE latents (deterministic: the encoder has no posterior)."""
        return self.vae.encode(self.normalization.normalize(anchor.to(self.device, torch.float32)))

    def blend_latents(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, C, L) latents of the knn_blend adapters a residual denoiser generates the difference to."""
        distances = self.location_distances(features)  # (B, L)
        blends = [retrieval.knn_blend(self.location_means, d, self.residual.k, self.residual.weighting) for d in distances]
        return self._anchor_latents(torch.stack(blends))

    def denoiser_context(self, features: torch.Tensor) -> dict:
        """(B, D) -> the denoiser's extra inputs: for a retrieval-augmented one, `neighbours` = the latents
        (B, k, C, L) of the k nearest seen locations' mean adapters and their distances (B, k); else none."""
        if not self.neighbours:
            return {}
        distances, index = retrieval.neighbours(self.location_distances(features), self.neighbours)  # (B, k) each
        return {"neighbours": (self.location_latents[index.to(self.device)], distances.to(self.device))}

    def _sample_block(
        self, features: torch.Tensor, seeds: Sequence[int], steps: int, anchor: torch.Tensor | None, strength: float
    ) -> torch.Tensor:
        """(SAMPLING_BLOCK, D) features and seeds -> (SAMPLING_BLOCK, C, L) latents by DDIM (eta=0) from each
        seed's own noise; with `anchor`, SDEdit from the anchors' latents (`generate_vectors`)."""
        num_train_timesteps = self.scheduler_config["num_train_timesteps"]
        condition = standardize(features.to(self.device), self.condition_mean, self.condition_std)
        noise = [
            torch.randn(self.vae.latent_shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds
        ]
        noise = torch.stack(noise).to(self.device)  # (B, C, L); drawn on CPU so every device starts equal
        # A scheduler per call: `set_timesteps` changes its state, and calls may come from several threads.
        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps, device=self.device)
        timesteps = scheduler.timesteps
        base = self.blend_latents(features) if self.residual else torch.zeros_like(noise)  # (B, C, L)
        context = self.denoiser_context(features)
        if anchor is None:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = self._anchor_latents(anchor) - base  # (B, C, L)
            timesteps = timesteps[timesteps < strength * num_train_timesteps]
            if len(timesteps) == 0:
                return latents + base
            latents = scheduler.add_noise(latents, noise, timesteps[:1].expand(len(latents)))
        for t in timesteps:
            noise_pred = self.denoiser(latents, t.expand(len(latents)), condition, **context)
            latents = scheduler.step(noise_pred, t, latents, eta=0.0).prev_sample
        return latents + base

    @torch.no_grad()
    def generate_vectors(
        self,
        features: torch.Tensor,
        seeds: Sequence[int],
        steps: int = DEFAULT_STEPS,
        anchor: torch.Tensor | None = None,
        strength: float = 1.0,
    ) -> torch.Tensor:
        """(B, D) features, B seeds -> (B, P) flat adapter vectors (un-normalised, `self.shapes` order) by DDIM
        (eta=0) from each seed's own noise.

        With `anchor` (B, P) flat adapters, SDEdit: only the DDIM timesteps t < strength * T are run, starting
        from the anchor's latent noised to the first of them with the same seeded noise; strength 0 (or no
        timestep left) returns the anchor through the VAE, 1 starts from (almost) pure noise. A residual
        denoiser's samples are added to the blend's latent (`blend_latents`).

        Rows go through the models in blocks of exactly `SAMPLING_BLOCK` (the last one padded with copies of its
        last row), so a row's bytes do not depend on the other rows of the call."""
        if len(seeds) != len(features):
            raise ValueError(f"{len(features)} condition rows but {len(seeds)} seeds")
        num_train_timesteps = self.scheduler_config["num_train_timesteps"]
        if not 1 <= steps <= num_train_timesteps:
            raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if anchor is None and strength != 1.0:
            raise ValueError("strength below 1 needs an anchor to start from")
        if anchor is not None and len(anchor) != len(features):
            raise ValueError(f"{len(features)} condition rows but {len(anchor)} anchors")
        if anchor is not None and (anchor.dim() != 2 or anchor.shape[1] != self.vae.num_params):
            raise ValueError(f"anchor must be (B, {self.vae.num_params}) flat adapters, got {tuple(anchor.shape)}")
        vectors = [torch.zeros(0, self.vae.num_params)]
        for start in range(0, len(features), SAMPLING_BLOCK):
            rows = min(SAMPLING_BLOCK, len(features) - start)
            block = [start + min(i, rows - 1) for i in range(SAMPLING_BLOCK)]  # padded by repeating the last row
            latents = self._sample_block(
                features[block], [seeds[i] for i in block], steps, None if anchor is None else anchor[block], strength
            )
            vectors.append(self.normalization.denormalize(self.vae.decode(latents))[:rows].cpu())
        return torch.cat(vectors)

    def generate(
        self, images: Sequence[Image.Image], seeds: Sequence[int] | int = 0, steps: int = DEFAULT_STEPS
    ) -> list[dict[str, torch.Tensor]]:
        """One adapter (PEFT-key state dict) per image; an int seed is used for every image."""
        seeds = [seeds] * len(images) if isinstance(seeds, int) else list(seeds)
        vectors = self.generate_vectors(self.embed(images), seeds, steps)
        return [{k: v.contiguous() for k, v in unflatten(vector, self.shapes).items()} for vector in vectors]

    def metadata(self, seed: int, steps: int, distance: float) -> dict[str, str]:
        """What a generated adapter file records about its origin (safetensors metadata: str -> str)."""
        return {
            "seed": str(seed),
            "steps": str(steps),
            "store_id": self.store_id,
            "base_model_hash": self.base_model_hash,
            "lora_config": json.dumps(self.layout.to_dict(), sort_keys=True),
            "condition_distance": f"{distance:.6f}",
        }
