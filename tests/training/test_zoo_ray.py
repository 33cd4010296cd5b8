"""The zoo on Ray: the same checkpoints as the local pool, on a simulated two-node cluster that the tests share,
retried after a worker is killed, and a clear error when a worker cannot see the dataset."""

import json
import os
import re
import shutil
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from model_store.store import Store
from training.cli import main
from training.data import DataError, read_cct
from training.profiles import get_profile
from training.ray_executor import job_runner
from training.zoo import Executor, collect_zoo, load_zoo_results


def zoo_digests(root: Path) -> dict[str, str]:
    files = json.loads((root / "manifest.json").read_text())["files"]
    return {k: v["sha256"] for k, v in files.items() if k.startswith("zoo/") and k.endswith(".safetensors")}


def without_zoo(source: Path, root: Path) -> Store:
    """A copy of a store after pretrain, as if the zoo never ran."""
    shutil.copytree(source, root, ignore=shutil.ignore_patterns("zoo"))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith("zoo/")}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return Store(root)


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of one CPU each on this machine (ray.cluster_utils), shared by the tests of this module."""
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install '.[ray]'")
    import ray
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes.add_node(num_cpus=1)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address)
    yield nodes
    ray.shutdown()
    nodes.shutdown()


class RunWorkers(threading.Thread):
    """Watches the Ray worker processes that execute a zoo run (`ray::_ray_run`, children of a node's raylet)."""

    def __init__(self, cluster, on_seen=None):
        super().__init__(daemon=True)
        self.raylets = {node.all_processes["raylet"][0].process.pid for node in cluster.list_all_nodes()}
        self.on_seen = on_seen  # called with the pid of each run worker met, until it returns True
        self.nodes: set[int] = set()  # raylets whose workers ran a run
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            for pid, parent in run_workers():
                if parent in self.raylets:
                    self.nodes.add(parent)
                    if self.on_seen is not None and self.on_seen(pid):
                        self.on_seen = None


def run_workers() -> list[tuple[int, int]]:
    """(pid, parent pid) of every process titled `ray::_ray_run`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::_ray_run"):
                stat = (proc / "stat").read_text()
                found.append((int(proc.name), int(stat.rsplit(")", 1)[1].split()[1])))
        except OSError:
            continue  # ended meanwhile
    return found


RAY = job_runner(Executor("ray"))
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="watches worker processes in /proc")


def test_two_node_ray_zoo_writes_the_local_executors_checkpoints(cluster, smoke_zoo_store, smoke_world, tmp_path):
    store = without_zoo(smoke_zoo_store, tmp_path / "store")
    profile = get_profile("smoke")
    watch = RunWorkers(cluster)
    watch.start()
    try:
        collect_zoo(read_cct(smoke_world), store, profile.zoo, profile.lora, progress=False, run_jobs=RAY)
    finally:
        watch.stop.set()
    assert zoo_digests(store.root) == zoo_digests(smoke_zoo_store)  # bit for bit, every checkpoint
    ours, local = load_zoo_results(Store.open(store.root)), load_zoo_results(Store(smoke_zoo_store))
    strip = [[{k: v for k, v in run.items() if k != "seconds"} for run in ours[loc]] for loc in sorted(ours)]
    assert strip == [[{k: v for k, v in run.items() if k != "seconds"} for run in local[loc]] for loc in sorted(local)]
    assert watch.nodes == watch.raylets, "both nodes should have run part of the zoo"


def test_a_killed_ray_worker_is_retried_and_nothing_is_corrupt(cluster, smoke_zoo_store, smoke_world, tmp_path):
    store = without_zoo(smoke_zoo_store, tmp_path / "store")
    profile = get_profile("smoke")
    zoo = replace(profile.zoo, runs=1, reference_runs=0)  # run 0 of each seen location: the same seeds as the local zoo
    killed: list[int] = []

    def kill_once_it_wrote(pid: int) -> bool:
        # mid-run: a checkpoint of a run that is not registered yet is on disk
        if not any(p for p in (store.root / "zoo").rglob("step*.safetensors") if not has_result(p.parent)):
            return False
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        return True

    def has_result(run_folder: Path) -> bool:
        return (run_folder / "result.json").exists()

    watch = RunWorkers(cluster, on_seen=kill_once_it_wrote)
    watch.start()
    try:
        collect_zoo(read_cct(smoke_world), store, zoo, profile.lora, progress=False, run_jobs=RAY)
    finally:
        watch.stop.set()
    assert killed, "no run worker was caught mid-run"
    reopened = Store.open(store.root)  # every registered file verifies
    results = load_zoo_results(reopened)
    seen = read_cct(smoke_world).locations("seen")
    assert sorted(results) == sorted(seen) and all(len(runs) == 1 for runs in results.values())
    reference = zoo_digests(smoke_zoo_store)
    assert zoo_digests(store.root) == {k: v for k, v in reference.items() if "/run0/" in k and k.split("/")[1] in seen}
    assert not list(store.root.rglob("*.tmp"))


def test_a_dataset_the_workers_cannot_see_is_reported_not_retried(cluster, smoke_zoo_store, smoke_world, tmp_path):
    store = without_zoo(smoke_zoo_store, tmp_path / "store")
    profile = get_profile("smoke")
    dataset = read_cct(smoke_world)
    unmounted = tmp_path / "not-mounted-here"
    dataset.spec = replace(dataset.spec, root=unmounted, images=unmounted / "images")  # what a worker is told
    expected = f"failed on a Ray worker.*dataset folder not found: {re.escape(str(unmounted))}.*every node must see"
    with pytest.raises(DataError, match=expected):
        collect_zoo(dataset, store, profile.zoo, profile.lora, progress=False, run_jobs=RAY)
    assert not any(k.startswith("zoo/") for k in Store.open(store.root).manifest["files"])


def test_executor_ray_without_ray_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as when the extra is not installed
    command = ["zoo", "--data", str(tmp_path / "data"), "--store", str(tmp_path / "store"), "--profile", "smoke"]
    assert main([*command, "--executor", "ray"]) == 2
    assert "pip install '.[ray]'" in capsys.readouterr().err
    assert main([*command, "--run-gpus", "0.5"]) == 2  # a Ray flag without --executor ray
    assert "only apply to --executor ray" in capsys.readouterr().err
