"""The denoiser: given a noisy latent (B, C, L), the timestep and the condition features, predicts the clean
latent (or the noise; the scheduler's `prediction_type` says which, see `training.fit.FitConfig`).

As in the paper, the condition embedding is projected and ADDED to the timestep embedding; diffusers'
`TimestepEmbedding(cond_proj_dim=D)` does exactly that (sinusoidal features + Linear(condition), then an
MLP). Two bodies share that embedding:

- `kind="unet"` (default, the paper's): a 1D conv UNet over the latent length, built from diffusers'
  `ResidualTemporalBlock1D` (conv - GroupNorm - Mish, embedding added after the first conv), `Downsample1D`
  and `Upsample1D`, with skip connections between levels;
- `kind="mlp"`: a residual MLP over the flattened latent, cheaper for small latents (the feasibility
  prototype's choice).

Retrieval-augmented (`neighbours=k > 0`): the denoiser also sees the latents of the k seen locations nearest the
condition, (B, k, C, L), stacked onto the sample as k * C extra input channels (the latents are aligned along
their length), and their condition distances (B, k), whose logs join the condition features. It is trained
leave-self-out (`training.fit`): a location's own latent is never among its neighbours, so it learns how
retrieval errs for a location it has not seen. The neighbours come from the stored per-location mean adapters at
sampling time (`Generator.denoiser_context`), so a seen location added to them is retrieved without a refit.

The noise schedule lives outside the model (diffusers schedulers, see `model_store.generator`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from diffusers.models.downsampling import Downsample1D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResidualTemporalBlock1D
from diffusers.models.upsampling import Upsample1D
from torch import nn

DENOISER_FILE = "denoiser.safetensors"


@dataclass
class DenoiserConfig:
    kind: str = "unet"  # "unet" (1D conv UNet) | "mlp" (residual MLP over the flattened latent)
    channels: tuple[int, ...] = (32, 64)  # unet: widths per level; the length halves between levels
    kernel_size: int = 3  # unet: conv kernel along the latent length
    hidden: int = 256  # mlp: width
    depth: int = 3  # mlp: residual blocks
    embed_dim: int = 128  # timestep (+ condition) embedding width
    neighbours: int = 0  # retrieved seen locations the denoiser sees (module docstring); 0: none

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DenoiserConfig:
        data = dict(data)
        data["channels"] = tuple(data["channels"])
        return cls(**data)


def build_denoiser(config: DenoiserConfig, latent_shape: tuple[int, int], condition_dim: int) -> Denoiser:
    if config.neighbours < 0:
        raise ValueError(f"neighbours must be at least 0, got {config.neighbours}")
    if config.kind == "unet":
        return UNet1D(config, latent_shape, condition_dim)
    if config.kind == "mlp":
        return ResidualMLP(config, latent_shape, condition_dim)
    raise ValueError(f"unknown denoiser kind {config.kind!r}: expected 'unet' or 'mlp'")


def with_neighbours(
    sample: torch.Tensor, condition: torch.Tensor, neighbours: tuple[torch.Tensor, torch.Tensor] | None, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, L) sample, (B, D) condition and the neighbours' ((B, k, C, L) latents, (B, k) distances) ->
    ((B, (1 + k) C, L) input, (B, D + k) condition): what a retrieval-augmented body reads."""
    if k == 0:
        return sample, condition
    if neighbours is None:
        raise ValueError(f"this denoiser was trained with {k} retrieved neighbours; none were given")
    latents, distances = neighbours
    if latents.shape[1] != k or distances.shape != (len(sample), k):
        raise ValueError(f"expected {k} neighbours per row, got latents {tuple(latents.shape)}")
    inputs = torch.cat([sample, latents.flatten(1, 2)], dim=1)
    return inputs, torch.cat([condition, distances.clamp_min(1e-3).log()], dim=1)


class Embedding(nn.Module):
    """(B,) timesteps and (B, D) condition features -> (B, embed_dim), condition added before the MLP."""

    def __init__(self, embed_dim: int, condition_dim: int):
        super().__init__()
        self.timesteps = Timesteps(embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(embed_dim, embed_dim, cond_proj_dim=condition_dim)

    def forward(self, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timesteps(timesteps).to(condition.dtype), condition)


class Denoiser(nn.Module):
    """What both bodies share: neighbours stacked onto the input, then the timestep + condition embedding."""

    neighbours: int
    embedding: Embedding

    def forward(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor,
        neighbours: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """(B, C, L) noisy latent, (B,) timesteps, (B, D) condition [, neighbours] -> (B, C, L) prediction."""
        sample, condition = with_neighbours(sample, condition, neighbours, self.neighbours)
        return self.denoise(sample, self.embedding(timesteps, condition))  # embedding: (B, embed_dim)

    def denoise(self, sample: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """(B, (1 + k) C, L) input, (B, embed_dim) embedding -> (B, C, L) prediction."""
        raise NotImplementedError


class UNet1D(Denoiser):
    def __init__(self, config: DenoiserConfig, latent_shape: tuple[int, int], condition_dim: int):
        super().__init__()
        in_channels, length = latent_shape
        levels = len(config.channels)
        if length % 2 ** (levels - 1):
            raise ValueError(f"latent length {length} cannot be halved {levels - 1} times (unet channels)")
        embed, kernel = config.embed_dim, config.kernel_size
        self.neighbours = config.neighbours
        self.embedding = Embedding(embed, condition_dim + config.neighbours)
        inputs = in_channels * (1 + config.neighbours)
        self.conv_in = nn.Conv1d(inputs, config.channels[0], kernel, padding=kernel // 2)

        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip((config.channels[0], *config.channels[:-1]), config.channels)):
            last = i == levels - 1
            self.down.append(
                nn.ModuleList(
                    [
                        ResidualTemporalBlock1D(c_in, c_out, embed, kernel),
                        nn.Identity() if last else Downsample1D(c_out, use_conv=True),
                    ]
                )
            )
        self.mid = ResidualTemporalBlock1D(config.channels[-1], config.channels[-1], embed, kernel)
        self.up = nn.ModuleList()
        for i, (c_skip, c_out) in enumerate(zip(config.channels[::-1], (*config.channels[-2::-1], config.channels[0]))):
            last = i == levels - 1
            self.up.append(
                nn.ModuleList(
                    [
                        ResidualTemporalBlock1D(2 * c_skip, c_out, embed, kernel),
                        nn.Identity() if last else Upsample1D(c_out, use_conv_transpose=True),
                    ]
                )
            )
        self.conv_out = nn.Conv1d(config.channels[0], in_channels, kernel, padding=kernel // 2)
        nn.init.zeros_(self.conv_out.weight)  # start by predicting zeros (the mean latent, or no noise)
        nn.init.zeros_(self.conv_out.bias)

    def denoise(self, sample: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(sample)  # (B, channels[0], L)
        skips = []
        for block, downsample in self.down:
            x = block(x, emb)
            skips.append(x)  # (B, channels[i], L / 2^i)
            x = downsample(x)
        x = self.mid(x, emb)
        for block, upsample in self.up:
            x = upsample(block(torch.cat([x, skips.pop()], dim=1), emb))
        return self.conv_out(x)


class ResidualMLP(Denoiser):
    def __init__(self, config: DenoiserConfig, latent_shape: tuple[int, int], condition_dim: int):
        super().__init__()
        self.latent_shape = latent_shape
        size = latent_shape[0] * latent_shape[1]
        self.neighbours = config.neighbours
        self.embedding = Embedding(config.embed_dim, condition_dim + config.neighbours)
        self.proj_in = nn.Linear(size * (1 + config.neighbours), config.hidden)
        self.blocks = nn.ModuleList(ResidualMLPBlock(config.hidden, config.embed_dim) for _ in range(config.depth))
        self.proj_out = nn.Sequential(nn.LayerNorm(config.hidden), nn.SiLU(), nn.Linear(config.hidden, size))
        nn.init.zeros_(self.proj_out[-1].weight)
        nn.init.zeros_(self.proj_out[-1].bias)

    def denoise(self, sample: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(sample.flatten(1))  # (B, hidden)
        for block in self.blocks:
            x = block(x, emb)
        return self.proj_out(x).view(-1, *self.latent_shape)


class ResidualMLPBlock(nn.Module):
    def __init__(self, hidden: int, embed_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.fc1(nn.functional.silu(self.norm(x))) + self.emb(nn.functional.silu(emb))
        return x + self.fc2(nn.functional.silu(h))
