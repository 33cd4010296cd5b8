"""Stage 3: fit the generator (condition embeddings, then the parameter VAE, then the latent denoiser).

    wildpdiff fit --data data/demo --store model_store/demo [--force]

Trains on the zoo checkpoints of the SEEN locations only; interp and unseen locations are evaluation
references and never touch the generator. Each checkpoint is paired with background frames of its
location drawn at random from the training half (`model_store.condition.split_backgrounds`); the
held-out half measures how well fresh frames identify their location (recorded in the manifest).

Writes into the store:
    conditions.safetensors       stored seen-location frame embeddings, their location index, z-score stats
    condition_tower.safetensors  the condition encoder's own tower (only with --condition: a copy of the
                                 local checkpoint's image tower, so the store never needs that file)
    normalization.safetensors    per-coordinate mean/std of the flat adapters
    vae.safetensors              the parameter VAE
    denoiser.safetensors         the latent denoiser
    scheduler/scheduler_config.json   diffusers DDIM config (training noise uses DDPMScheduler.add_noise)
    fallback.safetensors         per-seen-location mean adapters, served out of distribution (model_store.ood)
    fit/loss_vae.png, fit/loss_denoiser.png
and every component's config and summary in the manifest, with the OOD threshold calibrated on the held-out
frames (`components.condition.ood_threshold`, rule in `model_store.ood`). Resumable: a finished component is
skipped unless its key changed (its settings or the store files it is trained from); `--force` redoes all.
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup
from tqdm import tqdm

from model_store import retrieval
from model_store.backbone import BACKBONE_FILE, Classifier, load_backbone
from model_store.condition import (
    CONDITION_TOWER_FILE,
    CONDITIONS_FILE,
    ConditionConfig,
    ConditionEncoder,
    is_night,
    location_identification,
    nearest,
    split_backgrounds,
    standardize,
)
from model_store.denoiser import DENOISER_FILE, DenoiserConfig, build_denoiser
from model_store.generator import SCHEDULER_FILE, Residual
from model_store.lora import LoraLayout, adapter_shapes
from model_store.ood import FALLBACK_FILE, OOD_QUANTILE, calibrate_threshold, location_means
from model_store.store import Store, StoreError, atomic_write_bytes
from model_store.vae import NORMALIZATION_FILE, VAE_FILE, Normalization, ParameterVAE, VAEConfig
from training.common import config_key, seed_everything
from training.data import CCTDataset, DataError, read_image
from training.zoo import Zoo, load_seen_zoo

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)


@dataclass(frozen=True)
class FitConfig:
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    vae_steps: int = 1500
    vae_batch_size: int = 64
    vae_lr: float = 3e-3
    denoiser_steps: int = 3000
    denoiser_batch_size: int = 64
    denoiser_lr: float = 2e-3
    warmup_steps: int = 100  # linear lr warm-up, then cosine decay (both networks)
    train_timesteps: int = 1000
    # What the denoiser predicts: "sample" (the clean latent) | "epsilon" (the noise) | "v_prediction".
    # Measured on the demo zoo (seen locations, UNet): epsilon-prediction samples landed between a location's
    # runs, sample-prediction on a run; mean val accuracy of generated adapters 0.933 vs 0.935.
    prediction_type: str = "sample"
    # What the denoiser generates: "latent" (the adapter's VAE latent) or "residual" (that latent minus the
    # latent of the knn_blend of the `residual_k` nearest other seen locations: learn only the correction).
    denoiser_target: str = "latent"
    residual_k: int = 3
    residual_weighting: str = "inverse_distance"
    beta_schedule: str = "linear"  # DDPM's; any diffusers beta_schedule name
    seed: int = 0
    # These networks are small: one thread is about as fast as two, and on shared cores two threads
    # spin-wait for each other (measured 16x slower per step with 2 threads under load).
    threads: int = 1


def fit(dataset: CCTDataset, store: Store, config: FitConfig, force: bool = False, progress: bool = True) -> dict:
    """Fit every unfinished component; returns {component: seconds} for the ones trained now."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _fit(dataset, store, config, force, progress)
    finally:
        torch.set_num_threads(threads)


def _fit(dataset: CCTDataset, store: Store, config: FitConfig, force: bool, progress: bool) -> dict:
    store.remove_temp_files()  # what a killed fit left midway through a write
    classifier, _ = load_backbone(store)
    shapes = adapter_shapes(classifier, LoraLayout.from_dict(store.manifest["components"]["lora"]))
    zoo, results = load_seen_zoo(store, shapes, dataset.locations("seen"))
    zoo_files = [c["file"] for location in zoo.locations for run in results[location] for c in run["checkpoints"]]
    trained = {}
    condition_files = [CONDITIONS_FILE] + ([CONDITION_TOWER_FILE] if config.condition.source == "open_clip" else [])
    if force or not is_current(store, config, "condition", condition_files, zoo_files):
        trained["condition"] = fit_conditions(dataset, store, classifier, zoo.locations, config)
    calibrated = "ood_threshold" in store.manifest["components"]["condition"]
    if force or not calibrated or not is_current(store, config, "ood", [FALLBACK_FILE], zoo_files):
        trained["ood"] = fit_ood(dataset, store, classifier, zoo, config, zoo_files)
    if force or not is_current(store, config, "vae", [VAE_FILE, NORMALIZATION_FILE], zoo_files):
        trained["vae"] = fit_vae(store, zoo, config, progress, zoo_files)
    if force or not is_current(store, config, "denoiser", [DENOISER_FILE, SCHEDULER_FILE], zoo_files):
        trained["denoiser"] = fit_denoiser(store, zoo, config, progress)
    if trained:
        store.set_component("fit", asdict(config))
    return trained


# The FitConfig fields each component is trained with; `threads` changes speed, not results. A test checks
# that every field has an owner, so no field can be left out of a component's key.
COMPONENT_FIELDS = {
    "condition": ("condition",),
    "ood": ("condition",),
    "vae": ("vae", "vae_steps", "vae_batch_size", "vae_lr", "warmup_steps", "seed"),
    "denoiser": (
        "denoiser", "denoiser_steps", "denoiser_batch_size", "denoiser_lr", "warmup_steps", "seed",
        "prediction_type", "train_timesteps", "beta_schedule", "denoiser_target", "residual_k", "residual_weighting",
    ),
}  # fmt: skip
SPEED_ONLY = ("threads",)


def settings(config: FitConfig, component: str) -> dict:
    """What a component is trained with (JSON form), recorded beside it in the manifest."""
    resolved = asdict(config)
    return json.loads(json.dumps({name: resolved[name] for name in COMPONENT_FIELDS[component]}))


def component_inputs(store: Store, component: str, zoo_files: Sequence[str]) -> dict[str, str]:
    """The store files a component is made from, by hash: the backbone for the condition embeddings, those and
    the seen zoo's checkpoints for the OOD threshold and the per-location mean adapters, the checkpoints for
    the VAE, the conditions and the VAE for the denoiser."""
    relpaths = {
        "condition": [BACKBONE_FILE],
        "ood": [CONDITIONS_FILE, *zoo_files],
        "vae": list(zoo_files),
        "denoiser": [CONDITIONS_FILE, NORMALIZATION_FILE, VAE_FILE],
    }
    return {relpath: store.manifest["files"][relpath]["sha256"] for relpath in relpaths[component]}


def component_key(store: Store, config: FitConfig, component: str, zoo_files: Sequence[str]) -> str:
    return config_key(settings(config, component), component_inputs(store, component, zoo_files))


def is_current(store: Store, config: FitConfig, component: str, outputs: list[str], zoo_files: list[str]) -> bool:
    """The one up-to-date rule (`training.common.config_key`): outputs present, recorded key = today's key."""
    if not all(store.has(relpath) for relpath in outputs):
        return False
    stored = store.manifest["components"].get(component, {})
    return stored.get("key") == component_key(store, config, component, zoo_files)


# -----------------------------------------------------------------------------
# 1. condition embeddings of the seen locations' training-half background frames


def embed_backgrounds(
    dataset: CCTDataset, encoder: ConditionEncoder, locations: list[str], half: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features (N, D), location index (N,) and night flag (N,) of the `half` ("train" | "fresh") frames."""
    images, location = [], []
    for index, name in enumerate(locations):
        train, fresh = split_backgrounds(dataset.backgrounds(name))
        readable = [image for image in map(read_image, train if half == "train" else fresh) if image is not None]
        if not readable:
            raise DataError(f"location {name!r} has no readable {half} background frames in {dataset.root}")
        images += readable
        location += [index] * len(readable)
    night = torch.tensor([is_night(image) for image in images])
    return encoder.embed(images), torch.tensor(location), night


def fit_conditions(
    dataset: CCTDataset, store: Store, classifier: Classifier, locations: list[str], config: FitConfig
) -> float:
    start = time.perf_counter()
    encoder = ConditionEncoder.build(classifier, load_backbone(store)[1], config.condition)  # reads a local file
    if config.condition.source == "open_clip":
        store.save_tensors(CONDITION_TOWER_FILE, encoder.tower.state_dict())
    features, location, _ = embed_backgrounds(dataset, encoder, locations, "train")
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    # Distance unit: how far a stored frame is from its nearest other stored frame (median over frames).
    standard = standardize(features, mean, std)
    others = torch.cdist(standard.double(), standard.double()).fill_diagonal_(float("inf"))
    distance_scale = others.min(dim=1).values.median().float()

    fresh, fresh_location, night = embed_backgrounds(dataset, encoder, locations, "fresh")
    correct = location_identification(features, location, fresh, fresh_location)
    fresh_distance = nearest(standardize(fresh, mean, std), standard)[0] / distance_scale
    store.save_tensors(
        CONDITIONS_FILE,
        {"features": features, "location": location, "mean": mean, "std": std, "distance_scale": distance_scale},
    )
    store.set_component(
        "condition",
        {
            "config": config.condition.to_dict(),
            "settings": settings(config, "condition"),
            "key": component_key(store, config, "condition", ()),
            "locations": locations,
            "dim": encoder.dim,
            "frames": len(features),
            # how well one fresh (held-out) frame names its location: 1-NN over the stored frames
            "location_id": {
                "all": correct.float().mean().item(),
                "day": correct[~night].float().mean().item() if (~night).any() else None,
                "night": correct[night].float().mean().item() if night.any() else None,
                "frames_day": int((~night).sum()),
                "frames_night": int(night.sum()),
            },
            "fresh_distance_median": fresh_distance.median().item(),
            "seconds": time.perf_counter() - start,
        },
    )
    return time.perf_counter() - start


def fit_ood(
    dataset: CCTDataset, store: Store, classifier: Classifier, zoo: Zoo, config: FitConfig, zoo_files: Sequence[str]
) -> float:
    """Calibrate the OOD threshold on the held-out frames and store the fallback adapters (model_store.ood)."""
    start = time.perf_counter()
    tower_state = store.load_tensors(CONDITION_TOWER_FILE) if config.condition.source == "open_clip" else None
    encoder = ConditionEncoder.build(classifier, load_backbone(store)[1], config.condition, tower_state)
    conditions = store.load_tensors(CONDITIONS_FILE)
    fresh, _, _ = embed_backgrounds(dataset, encoder, zoo.locations, "fresh")
    references = standardize(conditions["features"], conditions["mean"], conditions["std"])
    distance = nearest(standardize(fresh, conditions["mean"], conditions["std"]), references)[0]
    distance = distance / conditions["distance_scale"]
    store.save_tensors(FALLBACK_FILE, {"vectors": location_means(zoo.vectors, zoo.owner, len(zoo.locations))})
    component = dict(store.manifest["components"]["condition"])
    component["ood_threshold"] = calibrate_threshold(distance)
    component["ood_rule"] = f"quantile {OOD_QUANTILE} of {len(distance)} held-out frames of seen locations"
    store.set_component("condition", component)
    store.set_component("ood", {"key": component_key(store, config, "ood", zoo_files)})
    return time.perf_counter() - start


# -----------------------------------------------------------------------------
# 2. the parameter VAE


def fit_vae(store: Store, zoo: Zoo, config: FitConfig, progress: bool, zoo_files: Sequence[str] = ()) -> float:
    """`zoo_files`: the checkpoints `zoo` was read from, for the VAE's key (none: a key no fit run matches)."""
    start = time.perf_counter()
    generator = seed_everything(config.seed)
    normalization = Normalization.fit(zoo.vectors)
    x = normalization.normalize(zoo.vectors)  # (N, P)
    vae = ParameterVAE(x.shape[1], config.vae)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.vae_steps)
    losses = []
    vae.train()
    bar = tqdm(range(config.vae_steps), desc="vae", unit="step", disable=not progress)
    for step in bar:
        batch = x[torch.randint(len(x), (config.vae_batch_size,), generator=generator)]
        loss = torch.nn.functional.mse_loss(vae(batch), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")

    vae.eval()
    with torch.no_grad():
        latents = vae.encode(x)
        reconstruction_mse = torch.nn.functional.mse_loss(vae.decode(latents), x).item()
    store.save_tensors(NORMALIZATION_FILE, normalization.to_tensors())
    store.save_tensors(VAE_FILE, vae.state_dict())
    save_loss_plot(store, "fit/loss_vae.png", losses, "parameter VAE: L2 reconstruction (z-scored, noisy)")
    store.set_component(
        "vae",
        {
            "config": config.vae.to_dict(),
            "settings": settings(config, "vae"),
            "key": component_key(store, config, "vae", zoo_files),
            "num_params": x.shape[1],
            "checkpoints": len(x),
            "final_loss": sum(losses[-100:]) / len(losses[-100:]),
            "reconstruction_mse": reconstruction_mse,  # z-scored, eval mode (no noise)
            "latent_std": latents.std().item(),
            "seconds": time.perf_counter() - start,
        },
    )
    return time.perf_counter() - start


# -----------------------------------------------------------------------------
# 3. the latent denoiser


def fit_denoiser(store: Store, zoo: Zoo, config: FitConfig, progress: bool) -> float:
    if config.prediction_type not in ("epsilon", "sample", "v_prediction"):
        raise ValueError(f"unknown prediction_type {config.prediction_type!r}: epsilon, sample or v_prediction")
    start = time.perf_counter()
    generator = seed_everything(config.seed + 1)
    vae = ParameterVAE(zoo.vectors.shape[1], VAEConfig.from_dict(store.manifest["components"]["vae"]["config"]))
    vae.load_state_dict(store.load_tensors(VAE_FILE))
    normalization = Normalization.from_tensors(store.load_tensors(NORMALIZATION_FILE))
    with torch.no_grad():
        latents = vae.eval().encode(normalization.normalize(zoo.vectors))  # (N, C, L)

    conditions = store.load_tensors(CONDITIONS_FILE)
    features = standardize(conditions["features"], conditions["mean"], conditions["std"])  # (F, D)
    if store.manifest["components"]["condition"]["locations"] != zoo.locations:
        raise StoreError(f"{store.path(CONDITIONS_FILE)}: stored locations differ from the zoo's; rerun with --force")
    # Frames of location k are rows offsets[k] .. offsets[k] + counts[k] - 1 of `features` (stored in order).
    counts = torch.bincount(conditions["location"], minlength=len(zoo.locations))
    offsets = torch.cumsum(counts, 0) - counts
    if config.denoiser_target not in ("latent", "residual"):
        raise ValueError(f"unknown denoiser_target {config.denoiser_target!r}: latent or residual")
    residual = Residual(config.residual_k, config.residual_weighting) if config.denoiser_target == "residual" else None
    k = config.denoiser.neighbours
    if k > len(zoo.locations) - 1:
        raise ValueError(f"{k} neighbours asked for, but a seen location has only {len(zoo.locations) - 1} others")
    distances = leave_self_out_distances(features, conditions["location"], len(zoo.locations))  # (F, L)
    with torch.no_grad():  # (F, C, L): per stored frame, the latent its samples are added to
        base = frame_blend_latents(distances, zoo, residual, vae, normalization)
    if k:  # per stored frame, its k nearest OTHER locations, in the units of `Generator.location_distances`
        neighbour_distances, neighbour_index = retrieval.neighbours(distances / conditions["distance_scale"], k)
        with torch.no_grad():
            location_latents = vae.encode(normalization.normalize(zoo.means))  # (L, C, L'), what neighbours show

    scheduler = DDIMScheduler(
        num_train_timesteps=config.train_timesteps,
        beta_schedule=config.beta_schedule,
        clip_sample=False,
        prediction_type=config.prediction_type,
        timestep_spacing="trailing",  # sampling starts at t = T-1, pure noise, whatever the step count
    )
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    denoiser = build_denoiser(config.denoiser, vae.latent_shape, features.shape[1])
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=config.denoiser_lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.denoiser_steps)
    losses = []
    denoiser.train()
    bar = tqdm(range(config.denoiser_steps), desc="denoiser", unit="step", disable=not progress)
    for step in bar:
        index = torch.randint(len(latents), (config.denoiser_batch_size,), generator=generator)
        location = zoo.owner[index]
        # each checkpoint meets a random training-half frame of its own location
        frame = offsets[location] + (torch.rand(len(index), generator=generator) * counts[location]).long()
        clean = latents[index] - base[frame]
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(config.train_timesteps, (len(index),), generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, t)
        if config.prediction_type == "epsilon":
            target = noise
        elif config.prediction_type == "sample":
            target = clean
        else:
            target = noise_scheduler.get_velocity(clean, noise, t)
        context = {"neighbours": (location_latents[neighbour_index[frame]], neighbour_distances[frame])} if k else {}
        loss = torch.nn.functional.mse_loss(denoiser(noisy, t, features[frame], **context), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")

    store.save_tensors(DENOISER_FILE, denoiser.state_dict())
    save_scheduler(store, scheduler)
    save_loss_plot(store, "fit/loss_denoiser.png", losses, f"denoiser: MSE of the {config.prediction_type} prediction")
    store.set_component(
        "denoiser",
        {
            "config": config.denoiser.to_dict(),
            "settings": settings(config, "denoiser"),
            "key": component_key(store, config, "denoiser", ()),
            "target": config.denoiser_target,
            **({"residual": asdict(residual)} if residual else {}),
            "final_loss": sum(losses[-100:]) / len(losses[-100:]),
            "seconds": time.perf_counter() - start,
        },
    )
    return time.perf_counter() - start


def leave_self_out_distances(features: torch.Tensor, owner: torch.Tensor, num_locations: int) -> torch.Tensor:
    """(F, D) z-scored stored frames of the seen locations and their location (F,) -> (F, L) distance of each
    frame to each location's closest stored frame, in the frames' feature units, with the frame's OWN location at
    infinity: in training a frame never retrieves its own location, as a new location at sampling time cannot."""
    distances = torch.cdist(features.double(), features.double())  # (F, F)
    per_location = torch.full((len(features), num_locations), float("inf"), dtype=torch.float64)
    per_location = per_location.scatter_reduce(1, owner.expand_as(distances), distances, "amin")  # (F, L)
    per_location[torch.arange(len(features)), owner] = float("inf")
    return per_location.float()


def frame_blend_latents(
    distances: torch.Tensor, zoo: Zoo, residual: Residual | None, vae: ParameterVAE, normalization: Normalization
) -> torch.Tensor:
    """(F, L) leave-self-out distances of the stored frames -> (F, C, L') latents of the knn_blend each frame
    retrieves from the OTHER locations (a location's own mean adapter would make the residual ~0 in training and
    useless on a new location); zeros for a latent denoiser."""
    if residual is None:
        return torch.zeros(len(distances), *vae.latent_shape)
    k = min(residual.k, len(zoo.locations) - 1)  # never reach the location's own (infinite) distance
    blends = torch.stack([retrieval.knn_blend(zoo.means, d, k, residual.weighting) for d in distances])
    return vae.eval().encode(normalization.normalize(blends))


def save_scheduler(store: Store, scheduler: DDIMScheduler) -> None:
    """`save_pretrained` into a temp folder beside, then move the file: the store's writes stay atomic."""
    folder = store.path(SCHEDULER_FILE).parent
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".scheduler.", suffix=".tmp") as tmp:  # store.TEMP_PATTERN
        scheduler.save_pretrained(tmp)
        Path(tmp, Path(SCHEDULER_FILE).name).replace(store.path(SCHEDULER_FILE))
    store.register(SCHEDULER_FILE)


def save_loss_plot(store: Store, relpath: str, losses: list[float], title: str) -> None:
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(losses, lw=0.5, alpha=0.4, label="step")
    window = max(1, len(losses) // 50)
    smooth = torch.tensor(losses).unfold(0, window, 1).mean(1) if len(losses) >= window else torch.tensor(losses)
    axis.plot(range(window - 1, window - 1 + len(smooth)), smooth, lw=1.5, label=f"mean of {window}")
    axis.set(title=title, xlabel="step", ylabel="loss", yscale="log")
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(store.path(relpath), buffer.getvalue())
    store.register(relpath)
