"""Named profiles: every stage's config for `smoke` (tests, ~3 min), `demo` (the main job, ~25 min on
2 CPU cores) and `paper` (paper scale, 19 classes, ~3,000 checkpoints, for a GPU)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from model_store.backbone import BackboneConfig
from model_store.denoiser import DenoiserConfig
from model_store.lora import LoraLayout
from model_store.vae import VAEConfig
from training.evaluation.config import (
    AnchoredConfig,
    EvalConfig,
    FewShotEvalConfig,
    HypernetConfig,
    RepresentationConfig,
    ZeroLabelEvalConfig,
)
from training.fit import FitConfig
from training.pretrain import PretrainConfig
from training.studies import AblationConfig, ScalingConfig
from training.world import EXTRA_SPECIES, SPECIES, WorldConfig
from training.zoo import ZooConfig


@dataclass(frozen=True)
class Profile:
    name: str
    world: WorldConfig = field(default_factory=WorldConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    lora: LoraLayout = field(default_factory=LoraLayout)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)


PROFILES = {
    "smoke": Profile(
        "smoke",
        world=WorldConfig(
            n_pretrain=2,
            pretrain_frames=600,
            n_seen=6,
            n_interp=2,
            n_unseen=2,
            train_frames=96,
            val_frames=32,
            test_frames=64,
            backgrounds=6,
        ),
        pretrain=PretrainConfig(steps=300, batch_size=64),
        zoo=ZooConfig(warmup_steps=30, checkpoints=5),
        fit=FitConfig(vae_steps=150, denoiser_steps=200, vae_batch_size=32, denoiser_batch_size=32, warmup_steps=20),
        evaluate=EvalConfig(
            samples=3,
            baseline_samples=2,
            steps=20,
            timing_repeats=2,
            hypernet=HypernetConfig(steps=200),
            anchored=AnchoredConfig(strengths=(0.0, 0.3, 0.6), samples=2),
            fewshot=FewShotEvalConfig(shots=(1, 5), candidates=4, refine_steps=(0, 5)),
            representation=RepresentationConfig(frames=2, samples=2),
            zerolabel=ZeroLabelEvalConfig(frames=(8, 32), choose_at=32, steps=3, max_locations=2),
        ),
        ablation=AblationConfig(intervals=(1, 10), locations=2, vae_steps=100, denoiser_steps=100, samples=2),
        scaling=ScalingConfig(sizes=(3, 6), seeds=(0,), vae_steps=100, denoiser_steps=100, samples=2),
    ),
    "demo": Profile("demo", pretrain=PretrainConfig(steps=1500)),
    "paper": Profile(
        "paper",
        world=WorldConfig(
            image_size=64,
            n_pretrain=24,
            pretrain_frames=3000,
            n_seen=64,
            n_interp=12,
            n_unseen=6,
            train_frames=600,
            val_frames=200,
            test_frames=300,
            species=list(SPECIES) + list(EXTRA_SPECIES),
        ),
        backbone=BackboneConfig(image_size=64, width=128, layers=8, heads=4, embed_dim=128),
        pretrain=PretrainConfig(steps=8000, batch_size=256),
        zoo=ZooConfig(runs=5, warmup_steps=200, checkpoints=10, workers=8),
        fit=FitConfig(
            vae=VAEConfig(fold=16, channels=(64, 128, 256)),
            denoiser=DenoiserConfig(channels=(64, 128, 256), embed_dim=256),
            vae_steps=20000,
            denoiser_steps=40000,
            vae_batch_size=256,
            denoiser_batch_size=256,
        ),
    ),
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: choose one of {', '.join(PROFILES)}")
    return copy.deepcopy(PROFILES[name])  # stages adjust their configs (e.g. the class count)
