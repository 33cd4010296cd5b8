import pytest
import safetensors.torch
import torch

from model_store.backbone import BackboneConfig, build_classifier
from model_store.lora import LoraLayout, adapter_shapes
from model_store.store import safetensors_bytes
from model_store.vae import Normalization, ParameterVAE, VAEConfig

SMALL = VAEConfig(fold=16, channels=(8, 16), latent_channels=2, latent_length=8)


def num_params(rank: int, blocks: int, width: int = 32) -> int:
    classifier = build_classifier(BackboneConfig(width=width, layers=6, heads=2, image_size=16, embed_dim=16))
    return sum(torch.Size(s).numel() for s in adapter_shapes(classifier, LoraLayout(rank, 2.0 * rank, blocks)).values())


@pytest.mark.parametrize(("rank", "blocks"), [(1, 1), (2, 6), (4, 3)])
@pytest.mark.parametrize("config", [SMALL, VAEConfig()])
def test_shapes_for_several_layouts(rank, blocks, config):
    p = num_params(rank, blocks)
    vae = ParameterVAE(p, config).eval()
    z = vae.encode(torch.randn(3, p))
    assert z.shape == (3, config.latent_channels, config.latent_length)
    assert vae.decode(z).shape == (3, p)


def test_any_vector_length_is_padded_and_cropped():
    vae = ParameterVAE(1001, SMALL).eval()
    assert vae.padded % (SMALL.fold * 4) == 0 and vae.padded >= 1001
    assert vae.decode(vae.encode(torch.randn(2, 1001))).shape == (2, 1001)


def test_latent_scale_is_pinned_whatever_the_input_scale():
    vae = ParameterVAE(512, SMALL).train()
    z = vae.encode(100.0 * torch.randn(64, 512))  # the prototype's latent drifted to std 24.5
    assert torch.allclose(z.flatten(1).std(0), torch.ones(16), atol=0.05)


def test_training_pass_is_noisy_and_eval_is_deterministic():
    torch.manual_seed(0)
    vae = ParameterVAE(512, SMALL)
    x = torch.randn(8, 512)
    vae.train()
    assert not torch.equal(vae(x), vae(x))
    vae.eval()
    assert torch.equal(vae.decode(vae.encode(x)), vae.decode(vae.encode(x)))


def test_learns_to_reconstruct():
    torch.manual_seed(0)
    x = torch.randn(32, 3) @ torch.randn(3, 256) / 3**0.5  # a few directions, like checkpoints of a few runs
    vae = ParameterVAE(256, VAEConfig(fold=16, channels=(32, 64), latent_channels=2, latent_length=8))
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for _ in range(150):
        loss = torch.nn.functional.mse_loss(vae(x), x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval()
    assert torch.nn.functional.mse_loss(vae.decode(vae.encode(x)), x) < 0.1 * x.var()


def test_weights_round_trip_through_safetensors():
    vae = ParameterVAE(300, SMALL)
    vae.train()
    vae(torch.randn(4, 300))  # move the batch-norm running statistics away from their init
    loaded = ParameterVAE(300, SMALL)
    loaded.load_state_dict(safetensors.torch.load(safetensors_bytes(vae.state_dict())))
    x = torch.randn(5, 300)
    vae.eval(), loaded.eval()
    assert torch.equal(vae.decode(vae.encode(x)), loaded.decode(loaded.encode(x)))
    assert VAEConfig.from_dict(SMALL.to_dict()) == SMALL


def test_normalization_round_trip():
    vectors = torch.randn(20, 6) * torch.tensor([1.0, 2.0, 0.1, 5.0, 1.0, 0.0]) + 3.0
    normalization = Normalization.fit(vectors)
    z = normalization.normalize(vectors)
    assert torch.allclose(z[:, :5].std(0), torch.ones(5), atol=1e-5)
    assert torch.equal(z[:, 5], torch.zeros(20))  # a constant coordinate stays finite
    loaded = Normalization.from_tensors(safetensors.torch.load(safetensors_bytes(normalization.to_tensors())))
    assert torch.allclose(loaded.denormalize(z), vectors, atol=1e-5)
