import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import peft
import pytest
from safetensors.torch import load_file

from model_store.backbone import load_backbone, normalize
from model_store.lora import LoraLayout, adapter_accuracy, attach_lora
from model_store.store import Store
from training.data import read_cct
from training.profiles import get_profile
from training.zoo import ZooConfig, load_zoo_results, plan_jobs


def test_zoo_covers_every_location_with_its_runs(smoke_zoo_store, smoke_world):
    dataset = read_cct(smoke_world)
    zoo = get_profile("smoke").zoo
    results = load_zoo_results(Store.open(smoke_zoo_store))
    for location in dataset.locations("seen"):
        assert len(results[location]) == zoo.runs
    for location in dataset.locations("interp") + dataset.locations("unseen"):
        assert len(results[location]) == zoo.reference_runs
    for location, runs in results.items():
        for run in runs:
            assert run["labels_sha256"] == dataset.label_digest(location)  # the worker saw the parent's labels
            assert [c["step"] for c in run["checkpoints"]] == [
                zoo.warmup_steps + k * zoo.interval for k in range(1, zoo.checkpoints + 1)
            ]
    # Independent runs of one location are different adapters.
    a, b = (load_file(smoke_zoo_store / r["checkpoints"][-1]["file"]) for r in results[dataset.locations("seen")[0]])
    assert any((a[k] - b[k]).abs().max() > 1e-4 for k in a)


def test_every_job_carries_the_parents_resolved_spec(smoke_zoo_store, smoke_world):
    dataset = read_cct(smoke_world, classes=["blue_plain", "red_plain"])
    store = Store(smoke_zoo_store)
    jobs = plan_jobs(dataset, store, ZooConfig(), LoraLayout.from_dict(store.manifest["components"]["lora"]))
    assert jobs and all(job.spec == dataset.spec for job in jobs)
    assert dataset.spec.classes == ("blue_plain", "red_plain") and dataset.spec.tasks == dataset.tasks
    assert dataset.spec.images == smoke_world


def test_checkpoints_load_into_peft_and_reproduce_their_accuracy(smoke_zoo_store, smoke_world):
    store = Store.open(smoke_zoo_store)
    layout = LoraLayout.from_dict(store.manifest["components"]["lora"])
    location = read_cct(smoke_world).locations("seen")[0]
    run = load_zoo_results(store)[location][0]
    checkpoint = run["checkpoints"][-1]
    state = store.load_tensors(checkpoint["file"])

    model, config = load_backbone(store)
    peft_model = attach_lora(load_backbone(store)[0], layout)
    loaded = peft.set_peft_model_state_dict(peft_model, state)
    assert not loaded.unexpected_keys
    lora_params = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert len(lora_params) == len(state)

    test = read_cct(smoke_world).load(location, "test", config.image_size)
    scored = adapter_accuracy(model, state, layout, normalize(test[0], config), test[1])
    assert abs(scored - checkpoint["test_acc"]) < 1e-6
    assert max(c["test_acc"] for c in run["checkpoints"]) >= run["pretrain_test_acc"]


def test_zoo_resumes_after_being_killed(smoke_zoo_store, smoke_world, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(smoke_zoo_store, root)
    shutil.rmtree(root / "zoo")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("zoo/")}
    (root / "manifest.json").write_text(json.dumps(manifest))
    command = [sys.executable, "-m", "training", "zoo", "--data", str(smoke_world), "--store", str(root),
               "--profile", "smoke", "--quiet"]

    process = subprocess.Popen(command, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        done = [k for k in json.loads((root / "manifest.json").read_text())["files"] if k.endswith("result.json")]
        if len(done) >= 2:
            break
        time.sleep(0.2)
    assert process.poll() is None, "zoo finished before it could be interrupted"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    finished = {k: (root / k).stat().st_mtime_ns for k in Store(root).manifest["files"] if k.endswith("result.json")}
    assert finished
    run_folder = (root / next(iter(finished))).parent
    (run_folder / ".step00031.safetensors.x1.tmp").write_bytes(b"half a checkpoint")  # as a kill inside a write
    (root / ".manifest.json.x2.tmp").write_text("{")
    subprocess.run(command, check=True, timeout=300)

    store = Store.open(root)  # every listed file verifies
    expected = sum(len(runs) for runs in load_zoo_results(Store.open(smoke_zoo_store)).values())
    assert sum(len(runs) for runs in load_zoo_results(store).values()) == expected
    assert all((root / k).stat().st_mtime_ns == t for k, t in finished.items()), "a finished run was redone"
    assert not list(root.rglob("*.tmp"))


def pool_workers(pid: int) -> list[int]:
    """The zoo's spawned pool workers among the children of process `pid`."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(child) for child in (task / "children").read_text().split()]
    return [child for child in children if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def store_files(root: Path) -> dict[str, int]:
    """Every file of the store but temp files (a write interrupted at the kill may still close its temp file)."""
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and not p.name.endswith(".tmp")}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads worker processes from /proc")
def test_zoo_workers_die_with_the_zoo_process(smoke_zoo_store, smoke_world, tmp_path):
    """kill -9 of the zoo process alone (not its group): its pool workers end and write nothing more."""
    root = tmp_path / "store"
    shutil.copytree(smoke_zoo_store, root, ignore=shutil.ignore_patterns("zoo"))
    store = Store(root)
    store.manifest["files"] = {k: v for k, v in store.manifest["files"].items() if not k.startswith("zoo/")}
    store.update()
    command = [sys.executable, "-m", "training", "zoo", "--data", str(smoke_world), "--store", str(root),
               "--profile", "smoke", "--quiet"]
    process = subprocess.Popen(command, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None and not list(root.glob("zoo/*/run*/step*")):
            time.sleep(0.1)  # until the workers write checkpoints
        workers = pool_workers(process.pid)
        assert process.poll() is None and workers, "the zoo should be running its workers"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        after_kill = store_files(root)
        deadline = time.time() + 60
        while time.time() < deadline and any(alive(pid) for pid in workers):
            time.sleep(0.1)
        assert not any(alive(pid) for pid in workers), "a pool worker outlived the zoo process"
        assert store_files(root) == after_kill, "a worker wrote into the store after the zoo process died"
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone when every worker ended
            os.killpg(process.pid, signal.SIGKILL)
