"""The pipeline runner: skip what is up to date, resume what was interrupted, redo what changed."""

import json
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from model_store.store import Store
from tests.training.kills import kill_when, manifest, mtimes, wildpdiff
from training.pipeline import STAGES, Stage, forget, run_pipeline
from training.profiles import get_profile


@dataclass
class FakeDataset:
    root: Path

    @property
    def tasks(self) -> dict:
        return json.loads((self.root / "tasks.json").read_text())


class Recorder:
    """Three toy stages, each writing one file from its input file and config, recording how they ran."""

    def __init__(self):
        self.calls: list[tuple[str, bool]] = []
        self.fail: str | None = None

    def stage(self, name: str, upstream: str | None) -> Stage:
        def run(dataset, store, profile, options, fresh, progress):
            self.calls.append((name, fresh))
            if self.fail == name:
                raise RuntimeError(f"{name} interrupted")
            source = store.load_json(f"{upstream}/out.json") if upstream else {}
            store.save_json(f"{name}/out.json", {"from": source, "steps": profile.pretrain.steps})

        return Stage(
            name,
            config=lambda p, o: {"steps": p.pretrain.steps} if name == "a" else {},
            inputs=lambda store: [f"{upstream}/out.json"] if upstream else [],
            run=run,
        )

    def stages(self) -> tuple[Stage, ...]:
        return (self.stage("a", None), self.stage("b", "a"), self.stage("c", "b"))


@pytest.fixture
def world(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "annotations.json").write_text("{}")
    (data / "tasks.json").write_text(json.dumps({"seen": ["S0"]}))
    return FakeDataset(data), Store.create(tmp_path / "store"), Recorder()


def test_rerun_skips_finished_stages(world):
    dataset, store, recorder = world
    profile = get_profile("smoke")
    first = run_pipeline(dataset, store, profile, stages=recorder.stages(), progress=False)
    assert first == dict.fromkeys("abc", "ran")
    assert recorder.calls == [("a", False), ("b", False), ("c", False)]
    assert all(store.manifest["pipeline"][name]["done"] for name in "abc")

    recorder.calls.clear()
    again = run_pipeline(dataset, Store(store.root), profile, stages=recorder.stages(), progress=False)
    assert again == dict.fromkeys("abc", "skipped") and recorder.calls == []


def test_changed_config_redoes_the_stage_and_everything_after_it(world):
    dataset, store, recorder = world
    profile = get_profile("smoke")
    run_pipeline(dataset, store, profile, stages=recorder.stages(), progress=False)
    recorder.calls.clear()
    profile = replace(profile, pretrain=replace(profile.pretrain, steps=profile.pretrain.steps + 1))  # stage a's
    run_pipeline(dataset, store, profile, stages=recorder.stages(), progress=False)
    assert recorder.calls == [("a", True), ("b", True), ("c", True)]  # b and c: their input file changed


def test_unchanged_output_leaves_later_stages_alone(world):
    dataset, store, recorder = world
    profile = get_profile("smoke")
    stages = recorder.stages()
    run_pipeline(dataset, store, profile, stages=stages, progress=False)
    recorder.calls.clear()
    # stage b's record says another key (e.g. its code's config changed) but it writes the same bytes again
    store.update(pipeline={**store.manifest["pipeline"], "b": {"key": "old", "done": True}})
    run_pipeline(dataset, store, profile, stages=stages, progress=False)
    assert recorder.calls == [("b", True)]


def test_changed_dataset_redoes_everything(world):
    dataset, store, recorder = world
    profile = get_profile("smoke")
    run_pipeline(dataset, store, profile, stages=recorder.stages(), progress=False)
    recorder.calls.clear()
    (dataset.root / "tasks.json").write_text(json.dumps({"seen": ["S0", "S1"]}))
    run_pipeline(dataset, store, profile, stages=recorder.stages(), progress=False)
    assert [name for name, _ in recorder.calls] == ["a", "b", "c"]


def test_interrupted_stage_resumes_without_redoing_earlier_ones(world):
    dataset, store, recorder = world
    profile = get_profile("smoke")
    recorder.fail = "b"
    with pytest.raises(RuntimeError, match="interrupted"):
        run_pipeline(dataset, store, profile, stages=recorder.stages(), progress=False)
    assert store.manifest["pipeline"]["a"]["done"] and not store.manifest["pipeline"]["b"]["done"]

    recorder.fail, recorder.calls = None, []
    result = run_pipeline(dataset, Store(store.root), profile, stages=recorder.stages(), progress=False)
    assert result == {"a": "skipped", "b": "ran", "c": "ran"}
    assert recorder.calls == [("b", False), ("c", False)]  # same key: resumed, not wiped


def test_forget_removes_files_and_manifest_entries(tmp_path):
    store = Store.create(tmp_path / "store")
    store.save_json("zoo/L/run0/result.json", {})
    store.save_json("keep.json", {})
    forget(store, "zoo")
    assert not store.path("zoo").exists() and list(store.manifest["files"]) == ["keep.json"]
    Store.open(store.root)  # still a consistent store


def test_real_stages_adopt_a_store_built_stage_by_stage(smoke_world, smoke_store, tmp_path):
    """A complete store without pipeline records: nothing is retrained, and a rerun skips everything."""
    from training.data import read_cct

    root = tmp_path / "store"
    shutil.copytree(smoke_store, root)
    backbone = Store(root).manifest["files"]["backbone.safetensors"]["sha256"]
    dataset, profile = read_cct(smoke_world), get_profile("smoke")
    first = run_pipeline(dataset, Store(root), profile, stages=STAGES[:3], progress=False)
    assert first == dict.fromkeys(("pretrain", "zoo", "fit"), "ran")
    store = Store.open(root)
    assert store.manifest["files"]["backbone.safetensors"]["sha256"] == backbone  # adopted, not retrained
    second = run_pipeline(dataset, store, profile, stages=STAGES[:3], progress=False)
    assert second == dict.fromkeys(("pretrain", "zoo", "fit"), "skipped")


def test_pipeline_resumes_after_kills_at_random_moments(smoke_zoo_store, smoke_store, smoke_world, tmp_path, capsys):
    """`wildpdiff pipeline` killed with -9 inside the zoo and inside the fit (random delays after a progress mark);
    the resumed run redoes no finished run, stage or component, and ends with the bytes of an unbroken build."""
    from training.data import read_cct

    root = tmp_path / "store"  # after pretrain: the zoo stage has work to do
    shutil.copytree(smoke_zoo_store, root, ignore=shutil.ignore_patterns("zoo"))
    files = manifest(root)["files"]
    store = Store(root)
    store.manifest["files"] = {k: v for k, v in files.items() if not k.startswith("zoo/")}
    store.update()
    command = wildpdiff("pipeline", "--data", smoke_world, "--store", root)
    delays = random.Random(18)

    def runs_done(n: int) -> bool:
        return sum(k.endswith("result.json") for k in manifest(root)["files"]) >= n

    kill_when(command, lambda: runs_done(2), delays.uniform(0, 0.5))
    records = manifest(root)["pipeline"]
    assert not records["zoo"]["done"], "the first kill should fall inside the zoo"
    finished = mtimes(root, [k for k in manifest(root)["files"] if k.endswith("result.json")])
    kill_when(command, lambda: "condition" in manifest(root)["components"], delays.uniform(0, 0.5))
    records, components = manifest(root)["pipeline"], manifest(root)["components"]
    assert records["zoo"]["done"] and not records["fit"]["done"], "the second kill should fall inside the fit"
    fitted = {"condition": "conditions.safetensors", "vae": "vae.safetensors"}
    finished |= mtimes(root, [relpath for name, relpath in fitted.items() if "key" in components.get(name, {})])
    (root / ".manifest.json.x1.tmp").write_text("{")  # as a kill inside a manifest write leaves it

    capsys.readouterr()
    result = run_pipeline(read_cct(smoke_world), Store(root), get_profile("smoke"), stages=STAGES[:3], progress=False)
    assert result == {"pretrain": "skipped", "zoo": "skipped", "fit": "ran"}
    assert "fit: running" in capsys.readouterr().out  # resumed, not redone from scratch
    store = Store.open(root)  # every listed file verifies
    assert mtimes(root, finished) == finished, "a finished run or component was redone"
    assert not list(root.rglob("*.tmp"))
    unbroken = Store(smoke_store).manifest["files"]
    for relpath in [k for k in unbroken if k.startswith("zoo/") and k.endswith(".safetensors")] + list(fitted.values()):
        assert store.manifest["files"][relpath] == unbroken[relpath], relpath
