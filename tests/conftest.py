"""Session fixtures: one tiny smoke-profile world and store, built once and shared by every test.

Tests must not modify these folders; a test that needs to change a store copies it first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from model_store.store import Store
from training.data import read_cct
from training.fit import fit
from training.pretrain import pretrain
from training.profiles import get_profile
from training.world import build_world
from training.zoo import collect_zoo


@pytest.fixture(scope="session")
def smoke_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke_world")
    build_world(get_profile("smoke").world, out, progress=False)
    return out


@pytest.fixture(scope="session")
def smoke_zoo_store(smoke_world, tmp_path_factory) -> Path:
    """A smoke store after pretrain and zoo (no generator yet)."""
    root = tmp_path_factory.mktemp("smoke_store") / "store"
    profile = get_profile("smoke")
    dataset = read_cct(smoke_world)
    store = Store.create(root, profile="smoke")
    pretrain(dataset, store, profile.backbone, profile.pretrain, progress=False)
    collect_zoo(dataset, store, profile.zoo, profile.lora, progress=False)
    return root


@pytest.fixture(scope="session")
def smoke_store(smoke_world, smoke_zoo_store, tmp_path_factory) -> Path:
    """A copy of `smoke_zoo_store` with a fitted generator (smoke FitConfig)."""
    root = tmp_path_factory.mktemp("smoke_fitted") / "store"
    shutil.copytree(smoke_zoo_store, root)
    fit(read_cct(smoke_world), Store(root), get_profile("smoke").fit, progress=False)
    return root
