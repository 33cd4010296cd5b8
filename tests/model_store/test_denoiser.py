import pytest
import safetensors.torch
import torch
from diffusers import DDIMScheduler

from model_store.denoiser import DenoiserConfig, build_denoiser
from model_store.store import safetensors_bytes

UNET = DenoiserConfig(kind="unet", channels=(8, 16), embed_dim=32)
MLP = DenoiserConfig(kind="mlp", hidden=32, depth=2, embed_dim=32)


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The output layers start at zero (predict no noise); give every weight a random value instead."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("config", [UNET, MLP, DenoiserConfig()])
@pytest.mark.parametrize("latent_shape", [(4, 16), (8, 8), (2, 32)])
def test_output_has_the_latent_shape(config, latent_shape):
    model = build_denoiser(config, latent_shape, condition_dim=12)
    out = model(torch.randn(3, *latent_shape), torch.tensor([0, 500, 999]), torch.randn(3, 12))
    assert out.shape == (3, *latent_shape)


@pytest.mark.parametrize("config", [UNET, MLP])
def test_condition_and_timestep_change_the_prediction(config):
    model = perturbed(build_denoiser(config, (4, 8), condition_dim=6))
    x, t, c = torch.randn(2, 4, 8), torch.tensor([10, 10]), torch.randn(2, 6)
    base = model(x, t, c)
    assert not torch.allclose(base, model(x, t, c + 1.0))
    assert not torch.allclose(base, model(x, t + 500, c))


def test_unet_refuses_a_length_it_cannot_halve():
    with pytest.raises(ValueError, match="cannot be halved"):
        build_denoiser(DenoiserConfig(channels=(8, 16, 32)), (4, 6), condition_dim=4)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown denoiser kind"):
        build_denoiser(DenoiserConfig(kind="transformer"), (4, 8), condition_dim=4)


@pytest.mark.parametrize("config", [UNET, MLP])
def test_weights_round_trip_through_safetensors(config):
    model = perturbed(build_denoiser(config, (4, 8), condition_dim=6))
    loaded = build_denoiser(DenoiserConfig.from_dict(config.to_dict()), (4, 8), condition_dim=6).eval()
    loaded.load_state_dict(safetensors.torch.load(safetensors_bytes(model.state_dict())))
    x, t, c = torch.randn(2, 4, 8), torch.tensor([3, 700]), torch.randn(2, 6)
    assert torch.equal(model(x, t, c), loaded(x, t, c))


def test_scheduler_config_round_trip(tmp_path):
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False, timestep_spacing="trailing")
    scheduler.save_pretrained(tmp_path)
    loaded = DDIMScheduler.from_pretrained(tmp_path)
    scheduler.set_timesteps(10)
    loaded.set_timesteps(10)
    assert torch.equal(scheduler.timesteps, loaded.timesteps)
    assert loaded.config.clip_sample is False


# -----------------------------------------------------------------------------
# retrieval-augmented: the k nearest locations' latents as extra channels, their distances beside the condition


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_a_retrieval_augmented_denoiser_reads_its_neighbours(kind):
    config = DenoiserConfig(kind=kind, channels=(8, 16), hidden=32, depth=2, embed_dim=32, neighbours=3)
    model = perturbed(build_denoiser(config, (4, 8), condition_dim=6))
    x, t, c = torch.randn(2, 4, 8), torch.tensor([10, 900]), torch.randn(2, 6)
    latents, distances = torch.randn(2, 3, 4, 8), torch.rand(2, 3) + 0.5
    base = model(x, t, c, neighbours=(latents, distances))
    assert base.shape == (2, 4, 8)
    assert not torch.allclose(base, model(x, t, c, neighbours=(latents + 1.0, distances)))
    assert not torch.allclose(base, model(x, t, c, neighbours=(latents, distances * 2)))
    with pytest.raises(ValueError, match="trained with 3 retrieved neighbours"):
        model(x, t, c)
    with pytest.raises(ValueError, match="expected 3 neighbours"):
        model(x, t, c, neighbours=(latents[:, :2], distances[:, :2]))


def test_retrieval_augmented_weights_round_trip_and_refuse_a_plain_config():
    config = DenoiserConfig(channels=(8, 16), embed_dim=32, neighbours=2)
    model = perturbed(build_denoiser(config, (4, 8), condition_dim=6))
    loaded = build_denoiser(DenoiserConfig.from_dict(config.to_dict()), (4, 8), condition_dim=6).eval()
    loaded.load_state_dict(safetensors.torch.load(safetensors_bytes(model.state_dict())))
    x, t, c = torch.randn(2, 4, 8), torch.tensor([3, 700]), torch.randn(2, 6)
    neighbours = (torch.randn(2, 2, 4, 8), torch.rand(2, 2))
    assert torch.equal(model(x, t, c, neighbours=neighbours), loaded(x, t, c, neighbours=neighbours))
    plain = build_denoiser(DenoiserConfig(channels=(8, 16), embed_dim=32), (4, 8), condition_dim=6)
    with pytest.raises(RuntimeError, match="size mismatch"):
        plain.load_state_dict(model.state_dict())


def test_an_old_config_without_neighbours_reads_as_none():
    data = DenoiserConfig().to_dict()
    del data["neighbours"]
    assert DenoiserConfig.from_dict(data).neighbours == 0
    with pytest.raises(ValueError, match="neighbours must be at least 0"):
        build_denoiser(DenoiserConfig(neighbours=-1), (4, 8), condition_dim=6)
