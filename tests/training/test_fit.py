import json
import random
import shutil
import subprocess
from dataclasses import fields, replace

import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors import safe_open

from model_store import retrieval
from model_store.backbone import load_backbone
from model_store.condition import CONDITIONS_FILE
from model_store.denoiser import DENOISER_FILE
from model_store.generator import SCHEDULER_FILE, Generator, Residual, StoredConditions
from model_store.lora import LoraLayout, adapter_shapes, flatten
from model_store.ood import FALLBACK_FILE
from model_store.retrieval import knn_blend
from model_store.store import MANIFEST, Store, StoreError
from model_store.vae import NORMALIZATION_FILE, VAE_FILE, Normalization, ParameterVAE, VAEConfig
from tests.training.kills import kill_when, manifest, mtimes, wildpdiff
from training import fit as fit_module
from training.cli import main
from training.data import read_cct
from training.fit import (
    COMPONENT_FIELDS,
    SPEED_ONLY,
    FitConfig,
    fit,
    fit_vae,
    frame_blend_latents,
    is_current,
    leave_self_out_distances,
)
from training.profiles import get_profile
from training.studies import refit_denoiser
from training.zoo import load_seen_zoo


def copy_store(source, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(source, root)
    return root


def without_zoo(source, tmp_path):
    """A copy of a store whose manifest forgets the zoo (as if `wildpdiff zoo` never ran)."""
    root = copy_store(source, tmp_path)
    manifest = json.loads((root / MANIFEST).read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("zoo/")}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def test_fit_writes_every_artifact_with_its_config(smoke_store, smoke_world):
    store = Store.open(smoke_store)
    for relpath in (CONDITIONS_FILE, VAE_FILE, DENOISER_FILE, SCHEDULER_FILE, "fit/loss_vae.png"):
        assert store.has(relpath)
    assert store.path("fit/loss_denoiser.png").read_bytes().startswith(b"\x89PNG")
    components = store.manifest["components"]
    profile = get_profile("smoke").fit
    assert components["vae"]["config"] == json.loads(json.dumps(profile.vae.to_dict()))
    assert components["denoiser"]["config"]["kind"] == profile.denoiser.kind
    assert components["fit"]["vae_steps"] == profile.vae_steps
    assert store.load_json(SCHEDULER_FILE)["_class_name"] == "DDIMScheduler"
    assert store.load_json(SCHEDULER_FILE)["clip_sample"] is False
    assert 0.5 < components["vae"]["latent_std"] < 2.0  # pinned scale


def seen_zoo(dataset, store):
    classifier = load_backbone(store)[0]
    shapes = adapter_shapes(classifier, LoraLayout.from_dict(store.manifest["components"]["lora"]))
    return load_seen_zoo(store, shapes, dataset.locations("seen"))[0]


def test_only_seen_locations_train_the_generator(smoke_store, smoke_world):
    dataset = read_cct(smoke_world)
    store = Store(smoke_store)
    components = store.manifest["components"]
    assert components["condition"]["locations"] == dataset.locations("seen")
    zoo = seen_zoo(dataset, store)
    assert components["vae"]["checkpoints"] == len(zoo.vectors)
    conditions = store.load_tensors(CONDITIONS_FILE)
    assert conditions["location"].max().item() == len(dataset.locations("seen")) - 1
    # the training half of the frames: 3 of the smoke world's 6 per location
    assert len(conditions["features"]) == 3 * len(dataset.locations("seen"))


def test_a_rerun_skips_finished_components(smoke_store, smoke_world):
    before = (smoke_store / MANIFEST).read_bytes()
    assert fit(read_cct(smoke_world), Store(smoke_store), get_profile("smoke").fit, progress=False) == {}
    assert (smoke_store / MANIFEST).read_bytes() == before


def test_every_fit_setting_belongs_to_a_component():
    """A new FitConfig field must join a component's key (or be declared speed-only), or this fails."""
    owned = {name for names in COMPONENT_FIELDS.values() for name in names} | set(SPEED_ONLY)
    assert owned == {field.name for field in fields(FitConfig)}


def test_a_new_vae_makes_the_denoiser_stale(smoke_store, smoke_world, tmp_path):
    root = copy_store(smoke_store, tmp_path)
    dataset, store = read_cct(smoke_world), Store(root)
    config = get_profile("smoke").fit
    zoo_files = [name for name in store.manifest["files"] if name.startswith("zoo/S") and name.endswith(".safetensors")]
    denoiser_files = [DENOISER_FILE, SCHEDULER_FILE]
    assert is_current(store, config, "denoiser", denoiser_files, zoo_files)
    fit_vae(store, seen_zoo(dataset, store), replace(config, vae_steps=3), False, zoo_files)
    assert not is_current(store, config, "denoiser", denoiser_files, zoo_files)
    assert list(fit(dataset, store, replace(config, vae_steps=3), progress=False)) == ["denoiser"]


def test_changed_settings_refit_only_that_component(smoke_store, smoke_world, tmp_path):
    root = copy_store(smoke_store, tmp_path)
    config = replace(get_profile("smoke").fit, denoiser_steps=3)
    assert list(fit(read_cct(smoke_world), Store(root), config, progress=False)) == ["denoiser"]
    assert Store(root).manifest["components"]["denoiser"]["settings"]["denoiser_steps"] == 3


def test_force_refits_everything(smoke_store, smoke_world, tmp_path):
    root = copy_store(smoke_store, tmp_path)
    config = replace(get_profile("smoke").fit, vae_steps=3, denoiser_steps=3)
    trained = fit(read_cct(smoke_world), Store(root), config, force=True, progress=False)
    assert list(trained) == ["condition", "ood", "vae", "denoiser"]
    Store.open(root)  # still consistent


def test_fit_refuses_a_store_without_a_zoo(smoke_zoo_store, smoke_world, tmp_path):
    root = without_zoo(smoke_zoo_store, tmp_path)
    with pytest.raises(StoreError, match="no LoRA zoo.*wildpdiff zoo"):
        fit(read_cct(smoke_world), Store(root), get_profile("smoke").fit, progress=False)


def test_cli_fit_without_a_zoo_is_one_line_and_exit_2(smoke_zoo_store, smoke_world, tmp_path, capsys):
    root = without_zoo(smoke_zoo_store, tmp_path)
    code = main(["fit", "--data", str(smoke_world), "--store", str(root), "--profile", "smoke", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "no LoRA zoo" in err and "Traceback" not in err


def test_cli_generate_writes_a_peft_adapter(smoke_store, smoke_world, tmp_path, capsys):
    image = sorted((smoke_world / "backgrounds").glob("*/001.png"))[0]
    out = tmp_path / "adapter"
    args = ["generate", "--store", str(smoke_store), "--background", str(image), "--seed", "4", "--steps", "5"]
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--out", str(tmp_path / "again")]) == 0
    weights = "adapter_model.safetensors"
    assert (out / weights).read_bytes() == (tmp_path / "again" / weights).read_bytes()
    with safe_open(out / weights, "pt") as f:
        metadata = f.metadata()
    assert metadata["seed"] == "4" and metadata["steps"] == "5"
    assert {"store_id", "base_model_hash", "condition_distance", "lora_config"} <= metadata.keys()
    backbone, _ = load_backbone(Store(smoke_store))
    model = PeftModel.from_pretrained(backbone, out)
    assert any("lora_A" in k and torch.count_nonzero(v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("problem", ["not_an_image", "missing_store", "corrupt_store"])
def test_cli_generate_errors_are_one_line_and_exit_2(problem, smoke_store, smoke_world, tmp_path, capsys):
    image = sorted((smoke_world / "backgrounds").glob("*/001.png"))[0]
    store = smoke_store
    if problem == "not_an_image":
        image = tmp_path / "frame.png"
        image.write_bytes(b"this is not a png")
    elif problem == "missing_store":
        store = tmp_path / "nowhere"
    else:
        store = copy_store(smoke_store, tmp_path)
        with open(store / DENOISER_FILE, "r+b") as f:
            f.seek(100)
            f.write(b"\x00\x00")
    code = main(["generate", "--store", str(store), "--background", str(image), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1


def test_cli_generate_warns_out_of_distribution(smoke_store, smoke_world, tmp_path, capsys):
    store = Store(smoke_store)
    generator = Generator.from_store(store)
    threshold = store.manifest["components"]["condition"]["ood_threshold"]
    dataset = read_cct(smoke_world)
    frames = [sorted((smoke_world / "backgrounds" / loc).glob("*.png"))[1] for loc in dataset.locations("unseen")]
    frames.append(sorted((smoke_world / "backgrounds" / dataset.locations("seen")[0]).glob("*.png"))[0])
    beyond = []
    for k, frame in enumerate(frames):
        distance = float(generator.distance(generator.embed([Image.open(frame)]))[0])
        args = ["generate", "--store", str(smoke_store), "--background", str(frame), "--steps", "2"]
        assert main([*args, "--out", str(tmp_path / f"a{k}")]) == 0
        warned = "warning: the background is out of distribution" in capsys.readouterr().err
        assert warned == (distance > threshold), (frame, distance, threshold)
        beyond.append(warned)
    assert any(beyond) and not all(beyond)  # both cases were exercised


@pytest.mark.parametrize("rule", ["mean", "closest"])
def test_cli_generate_from_several_frames(rule, smoke_store, smoke_world, tmp_path):
    generator = Generator.from_store(Store(smoke_store))
    location = read_cct(smoke_world).locations("seen")[0]
    paths = sorted((smoke_world / "backgrounds" / location).glob("*.png"))[1::2][:3]
    features = generator.embed([Image.open(p) for p in paths])
    condition, distance = generator.condition(features, rule)
    [expected] = generator.generate_vectors(condition, [2], steps=4)

    args = ["generate", "--store", str(smoke_store), "--seed", "2", "--steps", "4", "--out", str(tmp_path)]
    rule_flag = ["--frame-rule", rule] if rule != "mean" else []  # mean is the default
    assert main([*args, *rule_flag, "--background", *map(str, paths)]) == 0
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        state, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata()
    assert torch.allclose(flatten(state, generator.shapes), expected, atol=1e-6)
    assert metadata["background_frames"] == "3" and metadata["frame_rule"] == rule
    assert float(metadata["condition_distance"]) == pytest.approx(distance, abs=1e-5)


# -----------------------------------------------------------------------------
# the residual target: the denoiser learns only the correction to the leave-self-out blend


def test_residual_training_never_blends_a_location_with_itself(smoke_store, smoke_world, monkeypatch):
    """A spy on the blend: every stored frame retrieves other locations only, and its own mean cannot leak in."""
    store = Store(smoke_store)
    zoo = seen_zoo(read_cct(smoke_world), store)
    conditions = store.load_tensors(CONDITIONS_FILE)
    features = (conditions["features"] - conditions["mean"]) / conditions["std"]
    vae = ParameterVAE(zoo.vectors.shape[1], VAEConfig.from_dict(store.manifest["components"]["vae"]["config"]))
    vae.load_state_dict(store.load_tensors(VAE_FILE))
    normalization = Normalization.from_tensors(store.load_tensors(NORMALIZATION_FILE))
    calls = []
    blend = retrieval.knn_blend

    def spy(means, distances, k, weighting):
        calls.append(distances[distances.topk(k, largest=False).indices])
        return blend(means, distances, k, weighting)

    monkeypatch.setattr(retrieval, "knn_blend", spy)
    owner = conditions["location"]
    distances = leave_self_out_distances(features, owner, len(zoo.locations))
    base = frame_blend_latents(distances, zoo, Residual(3, "inverse_distance"), vae, normalization)
    assert len(calls) == len(features) and all(torch.isfinite(d).all() for d in calls)  # own location: infinite

    zoo.means[owner[0]] += 100.0  # a location's own mean changes nothing of what its frames retrieve
    again = frame_blend_latents(distances, zoo, Residual(3, "inverse_distance"), vae, normalization)
    own = owner == owner[0]
    assert torch.equal(base[own], again[own])


def test_a_residual_denoiser_generates_around_the_blend(smoke_store, smoke_world, tmp_path):
    config = replace(get_profile("smoke").fit, denoiser_target="residual", denoiser_steps=20)
    sub = refit_denoiser(Store(copy_store(smoke_store, tmp_path)), "variants/residual", config, progress=False)
    assert sub.manifest["components"]["denoiser"]["target"] == "residual"
    generator = Generator.from_store(sub)
    assert generator.residual is not None
    image = Image.open(sorted((smoke_world / "backgrounds").glob("*/001.png"))[0]).convert("RGB")
    features = generator.embed([image])
    first = generator.generate_vectors(features, [0])
    assert torch.equal(first, generator.generate_vectors(features, [0]))  # deterministic
    # strength 0 from the blend: exactly the blend's reconstruction, as for a latent denoiser
    distances = generator.location_distances(features)[0]
    anchor = knn_blend(generator.location_means, distances, 3, "inverse_distance")[None]
    reconstruction = generator.normalization.denormalize(generator.vae.decode(generator.blend_latents(features)))
    # to float32 rounding: generate_vectors computes in blocks of SAMPLING_BLOCK rows, this in a batch of one
    from_blend = generator.generate_vectors(features, [0], anchor=anchor, strength=0.0)
    assert torch.allclose(from_blend, reconstruction, atol=1e-6)


# -----------------------------------------------------------------------------
# the retrieval-augmented denoiser: it also sees the nearest OTHER seen locations' latents and distances


def retrieval_config(steps: int) -> FitConfig:
    fit_config = get_profile("smoke").fit
    return replace(fit_config, denoiser=replace(fit_config.denoiser, neighbours=2), denoiser_steps=steps)


def test_retrieval_training_never_shows_a_location_its_own_latent(smoke_store, tmp_path, monkeypatch):
    """A spy around the denoiser: every training row is shown the latents of the 2 locations nearest its frame
    among the OTHER seen locations, with their distances, and never its own location's latent."""
    calls = []
    build = fit_module.build_denoiser

    def spying_build(config, latent_shape, condition_dim):
        model = build(config, latent_shape, condition_dim)
        forward = model.forward

        def spy(sample, timesteps, condition, neighbours=None):
            calls.append((condition.clone(), neighbours[0].clone(), neighbours[1].clone()))
            return forward(sample, timesteps, condition, neighbours)

        model.forward = spy
        return model

    monkeypatch.setattr(fit_module, "build_denoiser", spying_build)
    sub = refit_denoiser(Store(copy_store(smoke_store, tmp_path)), "variants/n2", retrieval_config(5), progress=False)
    assert len(calls) == 5 and sub.manifest["components"]["denoiser"]["config"]["neighbours"] == 2

    conditions = sub.load_tensors(CONDITIONS_FILE)
    features = (conditions["features"] - conditions["mean"]) / conditions["std"]  # (F, D), as the denoiser sees
    owner = conditions["location"]
    shapes = adapter_shapes(load_backbone(sub)[0], LoraLayout.from_dict(sub.manifest["components"]["lora"]))
    zoo = load_seen_zoo(sub, shapes, sub.manifest["components"]["condition"]["locations"])[0]
    vae = ParameterVAE(zoo.vectors.shape[1], VAEConfig.from_dict(sub.manifest["components"]["vae"]["config"]))
    vae.load_state_dict(sub.load_tensors(VAE_FILE))
    normalization = Normalization.from_tensors(sub.load_tensors(NORMALIZATION_FILE))
    with torch.no_grad():
        location_latents = vae.eval().encode(normalization.normalize(zoo.means)).flatten(1)  # (L, C * L')
    expected = leave_self_out_distances(features, owner, len(zoo.locations)) / conditions["distance_scale"]
    for condition, latents, distances in calls:
        frame = torch.cdist(condition, features).argmin(dim=1)  # (B,) the stored frame of each row
        assert torch.allclose(features[frame], condition)
        shown = torch.cdist(latents.flatten(2), location_latents[None].expand(len(latents), -1, -1))  # (B, k, L)
        assert shown.min(dim=2).values.max() < 1e-4  # every neighbour is a location's latent ...
        shown = shown.argmin(dim=2)  # (B, k)
        assert not (shown == owner[frame][:, None]).any()  # ... never the row's own
        nearest_distances, nearest = expected[frame].topk(2, dim=1, largest=False)
        assert torch.equal(shown, nearest)  # ... the two nearest other locations, closest first
        assert torch.allclose(distances, nearest_distances)


def test_a_new_seen_location_joins_retrieval_without_a_refit(smoke_store, smoke_world, tmp_path):
    sub = refit_denoiser(Store(copy_store(smoke_store, tmp_path)), "variants/n2", retrieval_config(20), progress=False)
    generator = Generator.from_store(sub)
    assert generator.neighbours == 2
    image = Image.open(sorted((smoke_world / "backgrounds").glob("*/001.png"))[0]).convert("RGB")
    features = generator.embed([image])
    first = generator.generate_vectors(features, [0])
    assert torch.equal(first, generator.generate_vectors(features, [0]))  # deterministic

    # a new location: its stored frame is this very frame, its mean adapter a new one; no denoiser refit
    g = generator
    mean = g.location_means.mean(0) + 0.05 * torch.randn(g.location_means.shape[1], generator=torch.Generator())
    conditions = StoredConditions(
        [*g.locations, "new"], torch.cat([g.references, features]),
        torch.cat([g.reference_locations, torch.tensor([len(g.locations)])]),
        g.condition_mean, g.condition_std, g.distance_scale,
    )  # fmt: skip
    grown = Generator(
        g.classifier, g.backbone_config, g.layout, g.encoder, conditions, g.normalization, g.vae, g.denoiser,
        g.scheduler_config, classes=g.classes, location_means=torch.cat([g.location_means, mean[None]]),
    )  # fmt: skip
    latents, distances = grown.denoiser_context(features)["neighbours"]
    assert float(distances[0, 0]) == 0.0  # the new location is the nearest one ...
    assert torch.equal(latents[0, 0], grown.location_latents[-1])  # ... and is shown as itself
    with torch.no_grad():
        assert torch.allclose(latents[0, 0], g.vae.encode(g.normalization.normalize(mean[None]))[0], atol=1e-6)
    assert not torch.equal(grown.generate_vectors(features, [0]), first)


def test_fit_resumes_after_kills_at_random_moments(smoke_zoo_store, smoke_store, smoke_world, tmp_path):
    """kill -9 twice (after the condition embeddings, after the VAE, plus a random delay); the third run finishes
    without refitting what was finished, removes a killed write's temp folder, and ends where an unbroken fit ends."""
    root = copy_store(smoke_zoo_store, tmp_path)
    command = wildpdiff("fit", "--data", smoke_world, "--store", root)
    outputs = {"condition": CONDITIONS_FILE, "ood": FALLBACK_FILE, "vae": VAE_FILE, "denoiser": DENOISER_FILE}
    delays = random.Random(18)
    finished: dict[str, int] = {}
    for after in ("condition", "vae"):
        kill_when(command, lambda after=after: after in manifest(root)["components"], delays.uniform(0, 0.5))
        components = manifest(root)["components"]
        finished = mtimes(root, [outputs[name] for name in outputs if "key" in components.get(name, {})])
    assert finished and DENOISER_FILE not in finished, "the kills should fall inside the fit"
    (root / "scheduler" / ".scheduler.x1.tmp").mkdir(parents=True)  # as a kill inside save_scheduler leaves it
    (root / "scheduler" / ".scheduler.x1.tmp" / "scheduler_config.json").write_text("{")

    subprocess.run(command, check=True, timeout=300)
    store = Store.open(root)  # every listed file verifies
    assert mtimes(root, finished) == finished, "a finished component was fitted again"
    assert not list(root.rglob("*.tmp"))
    for relpath in (*outputs.values(), NORMALIZATION_FILE, SCHEDULER_FILE):  # the same bytes as an unbroken fit
        assert store.manifest["files"][relpath] == Store(smoke_store).manifest["files"][relpath], relpath
