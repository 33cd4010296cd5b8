"""The parameter VAE: flat LoRA vectors <-> small latents (C, L) that the denoiser works on (p-diff).

    encoder: adapter (P,) --z-score per coordinate--> x (P,) --fold--> (fold, P/fold) --conv, stride 2 (xN)-->
             (channels[-1], P/fold/2^N) --linear--> (C*L,) --BatchNorm, no affine--> latent (C, L)
    decoder: latent (C*L,) --linear, SiLU--> (decoder_hidden,) --linear--> x (P,)

Folding a run of `fold` neighbouring coordinates into the channels of one position first keeps the conv
stack short (a conv stack over the raw (1, P) vector was 16x slower in the feasibility prototype).

The decoder is an MLP, not the conv mirror of the encoder: coordinates of a parameter vector have no
translation structure, and a conv decoder, sharing its weights along the vector, rebuilds the demo zoo's
checkpoints less well: on the seen locations' val splits, reconstructions scored 0.926 (conv) against
0.944 (MLP) and 0.943 for the checkpoints themselves, at a similar cost.

As in p-diff, robustness comes from noise augmentation rather than a sampled posterior: Gaussian noise on
the input (~0.001) and on the latent (~0.1) during training, plain L2 reconstruction. The latent scale is
pinned by a batch normalisation without affine parameters: over the zoo every latent coordinate has mean 0
and std 1, so a latent noise of 0.1 means 10% of the spread (unpinned, the prototype's latent std drifted to
24.5 and the noise stopped mattering) and the diffusion model starts from a unit-scale latent.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

VAE_FILE = "vae.safetensors"
NORMALIZATION_FILE = "normalization.safetensors"


@dataclass
class VAEConfig:
    fold: int = 64  # neighbouring coordinates folded into the channels of one position
    channels: tuple[int, ...] = (32, 64)  # conv widths; each level halves the length (CPU-sized)
    latent_channels: int = 4
    latent_length: int = 16  # latent (C, L) = (4, 16): 64 numbers
    decoder_hidden: int = 256
    input_noise: float = 0.001  # training-time noise on the z-scored input
    latent_noise: float = 0.1  # training-time noise on the (unit-scale) latent
    groups: int = 8  # GroupNorm groups in the conv stack

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> VAEConfig:
        data = dict(data)
        data["channels"] = tuple(data["channels"])
        return cls(**data)


@dataclass
class Normalization:
    """Per-coordinate z-scoring of flat adapter vectors (G.pt's invertible normaliser), stored beside the VAE."""

    mean: torch.Tensor  # (P,)
    std: torch.Tensor  # (P,)

    @classmethod
    def fit(cls, vectors: torch.Tensor) -> Normalization:
        """(N, P) training vectors -> statistics; a coordinate that never moves gets std 1 (left as is)."""
        std = vectors.std(0)
        return cls(vectors.mean(0), torch.where(std > 1e-8, std, torch.ones_like(std)))

    def normalize(self, vectors: torch.Tensor) -> torch.Tensor:
        return (vectors - self.mean.to(vectors)) / self.std.to(vectors)

    def denormalize(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors * self.std.to(vectors) + self.mean.to(vectors)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Normalization:
        return cls(tensors["mean"], tensors["std"])


class ParameterVAE(nn.Module):
    """z-scored flat adapters (B, P) <-> latents (B, C, L)."""

    def __init__(self, num_params: int, config: VAEConfig):
        super().__init__()
        self.num_params = num_params
        self.config = config
        levels = len(config.channels)
        unit = config.fold * 2**levels  # the padded length must survive `levels` halvings after folding
        self.padded = math.ceil(num_params / unit) * unit
        self.length = self.padded // config.fold  # L0: positions after folding
        bottom = config.channels[-1] * (self.length // 2**levels)  # flattened width at the bottom of the stack
        latent = config.latent_channels * config.latent_length

        def norm_act(channels: int) -> list[nn.Module]:
            return [nn.GroupNorm(min(config.groups, channels), channels), nn.SiLU()]

        down: list[nn.Module] = [nn.Conv1d(config.fold, config.channels[0], 3, padding=1)]
        for c_in, c_out in zip((config.channels[0], *config.channels[:-1]), config.channels, strict=True):
            down += [nn.Conv1d(c_in, c_out, 4, stride=2, padding=1), *norm_act(c_out)]
        self.encoder = nn.Sequential(*down, nn.Flatten(), nn.Linear(bottom, latent))
        self.latent_norm = nn.BatchNorm1d(latent, affine=False)
        self.decoder = nn.Sequential(
            nn.Linear(latent, config.decoder_hidden), nn.SiLU(), nn.Linear(config.decoder_hidden, num_params)
        )

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.config.latent_channels, self.config.latent_length)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P) z-scored vectors -> (B, C, L) latents with unit scale over the zoo."""
        folded = nn.functional.pad(x, (0, self.padded - self.num_params))
        folded = folded.view(-1, self.length, self.config.fold).transpose(1, 2)  # (B, fold, L0)
        return self.latent_norm(self.encoder(folded)).view(-1, *self.latent_shape)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, L) latents -> (B, P) z-scored vectors."""
        return self.decoder(z.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training pass: reconstruction of `x` (B, P) through a noise-augmented input and latent."""
        z = self.encode(x + self.config.input_noise * torch.randn_like(x))
        return self.decode(z + self.config.latent_noise * torch.randn_like(z))
