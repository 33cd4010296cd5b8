"""Stage 2: the LoRA zoo, many fine-tuned adapters per location.

    wildpdiff zoo --data data/demo --store model_store/demo [--interval 10]

For every seen location (the generator's training data) and, as evaluation references only, every
interp and unseen location, fine-tune a LoRA on the first blocks of the pretrained backbone and save
a checkpoint every `interval` steps after warm-up. Checkpoints one step apart are near copies, so
each seen location also gets several independent runs (data order; all runs share one initialisation).

Layout on disk (PEFT key names, safetensors):
    zoo/<location>/run<k>/step<NNNNN>.safetensors
    zoo/<location>/run<k>/result.json   accuracies; its presence in the manifest marks the run done

Runs go to an executor: a process pool on this machine (`local`, one run per worker, one thread each)
or a Ray cluster (`ray`, one task per run: `training.ray_executor.job_runner` gives `collect_zoo` its
`run_jobs`). Both call the same `_run`. Each
checkpoint is written atomically by the worker; the parent alone writes the manifest and registers a
run's files only once the run is complete, so a killed collection restarts exactly at the unfinished runs
and never leaves a corrupt file. Workers die with the process that started them (`_die_with_parent`), so
none can write into a store that a restarted zoo is filling again.

Training goes through `model_store.lora.adapted_logits`, not PEFT's forward: PEFT 0.21 applies the
out_proj update of `nn.MultiheadAttention` twice (huggingface/peft PR #3774), so adapters trained
through it would mean something else than the file format says.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from model_store.backbone import BackboneConfig, load_backbone, normalize
from model_store.lora import LoraLayout, adapted_logits, adapter_accuracy, flatten, init_adapter
from model_store.store import Store, StoreError, atomic_save_tensors
from training.common import augment, seed_everything
from training.data import CCTDataset, DataError, DatasetSpec, read_dataset


@dataclass(frozen=True)
class ZooConfig:
    runs: int = 2  # independent runs per seen location
    reference_runs: int = 1  # runs per interp / unseen location (evaluation references)
    warmup_steps: int = 100  # steps before the first checkpoint
    checkpoints: int = 10  # checkpoints saved per run
    interval: int = 1  # steps between checkpoints (the paper's saving interval)
    batch_size: int = 64
    lr: float = 1e-2
    workers: int = 2
    seed: int = 0  # data order of each run derives from it
    init_seed: int = 0  # the one LoRA initialisation every run starts from (see `finetune`)
    folder: str = "zoo"  # always "zoo" (studies use sub-stores); kept so existing stores keep their stage keys


EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Executor:
    """Where the zoo's runs execute. Not part of any key: both executors write the same checkpoint bytes."""

    kind: str = "local"  # "local": a process pool of `ZooConfig.workers`; "ray": one Ray task per run
    ray_address: str | None = None  # ray: a cluster to join ("auto", "ray://head:10001"); None starts a local Ray
    run_cpus: float = 1.0  # ray: CPUs reserved per run (its torch threads: the whole part, at least 1)
    run_gpus: float = 0.0  # ray: GPUs per run (fractions share a GPU); > 0 trains the run on CUDA
    retries: int = 3  # ray: restarts of a run whose worker process or node died (never of a run that raised)

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise ValueError(f"unknown executor {self.kind!r}: {' or '.join(EXECUTORS)}")


class ExecutorError(Exception):
    """A run that could not be executed (Ray missing, a worker that died more often than retried)."""


@dataclass
class RunJob:
    spec: DatasetSpec  # the parent's resolved spec: the worker reads the same classes, labels and roles
    store: str
    location: str
    role: str
    run: int
    seed: int
    folder: str
    config: ZooConfig
    layout: LoraLayout
    backbone: BackboneConfig
    device: str = "cpu"  # "cuda" when the executor gave the run a GPU
    threads: int = 1  # torch threads of the run


def run_dir(folder: str, location: str, run: int) -> str:
    return f"{folder}/{location}/run{run}"


def plan_jobs(dataset: CCTDataset, store: Store, config: ZooConfig, layout: LoraLayout) -> list[RunJob]:
    backbone = BackboneConfig.from_dict(store.manifest["components"]["backbone"])
    jobs = []
    for role in ("seen", "interp", "unseen"):
        for location in dataset.locations(role):
            for run in range(config.runs if role == "seen" else config.reference_runs):
                seed = config.seed * 1_000_003 + hash_location(location) * 101 + run
                jobs.append(
                    RunJob(
                        dataset.spec,
                        str(store.root),
                        location,
                        role,
                        run,
                        seed,
                        config.folder,
                        config,
                        layout,
                        backbone,
                    )
                )
    return jobs


def hash_location(location: str) -> int:
    """A stable (not per-process salted) integer per location name."""
    return sum((i + 1) * ord(c) for i, c in enumerate(location)) % 100_003


def finetune(
    model: torch.nn.Module,
    backbone: BackboneConfig,
    layout: LoraLayout,
    config: ZooConfig,
    train: tuple[torch.Tensor, torch.Tensor],
    seed: int,
    on_checkpoint=None,
) -> dict[str, torch.Tensor]:
    """Fine-tune one adapter; `on_checkpoint(step, state)` is called at every saving step.

    Every run starts from the SAME LoRA initialisation (`config.init_seed`); `seed` only sets the data
    order. A LoRA is defined up to an invertible r x r mixing of A and B (B @ A is what acts), so runs from
    different random A's land far apart in parameter space although they compute nearly the same update;
    a shared start keeps all checkpoints in one coordinate system that the generator can learn.
    """
    state = init_adapter(model, layout, generator=torch.Generator().manual_seed(config.init_seed))
    generator = seed_everything(seed)
    pixels, labels = train  # on the CPU, where the CPU generator draws batches and flips: same data on any device
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(state.values(), lr=config.lr, weight_decay=0.0)
    total = config.warmup_steps + config.checkpoints * config.interval
    model.eval()  # no dropout in the tower; the base weights stay frozen
    for step in range(1, total + 1):
        index = torch.randint(len(labels), (config.batch_size,), generator=generator)
        batch = augment(pixels[index], generator).to(device)
        logits = adapted_logits(model, state, layout, normalize(batch, backbone))
        loss = torch.nn.functional.cross_entropy(logits, labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        after_warmup = step - config.warmup_steps
        if on_checkpoint is not None and after_warmup > 0 and after_warmup % config.interval == 0:
            on_checkpoint(step, {k: v.detach().cpu().clone() for k, v in state.items()})
    return {k: v.detach() for k, v in state.items()}


# Set in a worker by `_die_with_parent`: the process that started it (a pool worker's zoo process, a Ray worker's
# raylet); None in the zoo process itself.
_PARENT: int | None = None
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """Pool-worker initializer. A worker must not outlive its zoo process: it would go on writing into a store
    that a restarted zoo fills again. On Linux the kernel kills it with its parent (PR_SET_PDEATHSIG); everywhere,
    `_check_parent` before each write stops an orphan."""
    global _PARENT
    _PARENT = parent
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _check_parent()  # the parent may have died before prctl took effect


def _check_parent() -> None:
    if _PARENT is not None and os.getppid() != _PARENT:
        os._exit(1)  # an orphan: write nothing, return nothing


def _run(job: RunJob) -> tuple[RunJob, list[str], dict]:
    """Worker: one fine-tuning run; writes its checkpoints, returns their paths and the run's result.
    The one implementation of a run, whichever executor calls it."""
    torch.set_num_threads(job.threads)
    store = Store(job.store)
    model, _ = load_backbone(store)
    model.to(job.device)
    dataset = read_dataset(job.spec)
    size = job.backbone.image_size
    train, val, test = (dataset.load(job.location, split, size) for split in ("train", "val", "test"))
    # val and test are scored many times: normalised once, on the run's device
    val, test = ((normalize(pixels, job.backbone).to(job.device), labels) for pixels, labels in (val, test))
    folder = run_dir(job.folder, job.location, job.run)
    store.remove_temp_files(folder)  # left by an attempt of this run that was killed inside a write
    written, checkpoints = [], []
    start = time.perf_counter()

    def save(step: int, state: dict[str, torch.Tensor]) -> None:
        relpath = f"{folder}/step{step:05d}.safetensors"
        metadata = {"location": job.location, "run": str(job.run), "step": str(step), "seed": str(job.seed)}
        _check_parent()
        atomic_save_tensors(store.path(relpath), state, metadata)
        written.append(relpath)
        checkpoints.append(
            {
                "file": relpath,
                "step": step,
                "val_acc": adapter_accuracy(model, state, job.layout, *val),
                "test_acc": adapter_accuracy(model, state, job.layout, *test),
            }
        )

    finetune(model, job.backbone, job.layout, job.config, train, job.seed, on_checkpoint=save)
    empty = {k: torch.zeros(s.shape) for k, s in init_adapter(model, job.layout).items()}
    result = {
        "location": job.location,
        "role": job.role,
        "run": job.run,
        "seed": job.seed,
        "labels_sha256": dataset.label_digest(job.location),
        "seconds": time.perf_counter() - start,
        "pretrain_val_acc": adapter_accuracy(model, empty, job.layout, *val),
        "pretrain_test_acc": adapter_accuracy(model, empty, job.layout, *test),
        "checkpoints": checkpoints,
    }
    return job, written, result


def collect_zoo(
    dataset: CCTDataset,
    store: Store,
    config: ZooConfig,
    layout: LoraLayout,
    progress: bool = True,
    run_jobs: Callable[[list[RunJob]], Iterator[tuple[RunJob, list[str], dict]]] | None = None,
) -> dict:
    """Run every unfinished job; returns {location: [run results]} for all runs, finished before or now.

    `run_jobs`: the executor, jobs -> finished runs in any order (`training.ray_executor.job_runner`); None: the
    local pool of `config.workers` processes."""
    store.remove_temp_files()  # no worker runs yet: every temp file is a killed write's
    store.set_component("lora", layout.to_dict())
    store.set_component(config.folder, asdict(config))
    jobs = plan_jobs(dataset, store, config, layout)
    todo = [job for job in jobs if not store.has(f"{run_dir(job.folder, job.location, job.run)}/result.json")]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=config.folder, unit="run", disable=not progress)
    if todo:
        runs = pool_runs(todo, config.workers) if run_jobs is None else run_jobs(todo)
        with closing(runs):  # a failure here stops the workers too
            for job, written, result in runs:
                if result["labels_sha256"] != dataset.label_digest(job.location):
                    raise DataError(
                        f"the zoo worker of {job.location!r} read other frames or labels than this process; "
                        "was the dataset changed while the zoo ran, or does the worker see another copy of it?"
                    )
                store.register(*written)
                store.save_json(f"{run_dir(job.folder, job.location, job.run)}/result.json", result)
                bar.update()
    bar.close()
    return load_zoo_results(store, config.folder)


def pool_runs(todo: list[RunJob], workers: int) -> Iterator[tuple[RunJob, list[str], dict]]:
    """The local executor: finished runs, in the order they finish, from a pool of spawned processes."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(todo)), initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        yield from pool.imap_unordered(_run, todo)


def load_zoo_results(store: Store, folder: str = "zoo") -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {}
    for relpath in sorted(store.manifest["files"]):
        path = Path(relpath)
        if path.parts[0] == folder and path.name == "result.json":
            result = store.load_json(relpath)
            results.setdefault(result["location"], []).append(result)
    return results


# -----------------------------------------------------------------------------
# the one reader of a finished zoo: fit trains on it, evaluation and bench compare with it


@dataclass
class Zoo:
    """The seen locations' checkpoints (the generator's training set) as flat vectors."""

    locations: list[str]
    vectors: torch.Tensor  # (C, P) every checkpoint of every run
    owner: torch.Tensor  # (C,) index into `locations`

    def __post_init__(self) -> None:
        self.means = torch.stack([self.of(loc).mean(0) for loc in self.locations])  # (L, P)
        # Distances and noise are measured per coordinate in z-score units, as the parameter VAE sees them.
        self.scale = self.vectors.std(0).clamp_min(1e-8) if len(self.vectors) > 1 else torch.ones_like(self.means[0])

    def of(self, location: str) -> torch.Tensor:
        return self.vectors[self.owner == self.locations.index(location)]

    def mean_of(self, location: str) -> torch.Tensor:
        return self.means[self.locations.index(location)]


def load_seen_zoo(
    store: Store, shapes: dict[str, tuple[int, ...]], seen: list[str], folder: str = "zoo"
) -> tuple[Zoo, dict[str, list[dict]]]:
    """The checkpoints of the `seen` locations, in that order, and every run result by location."""
    results = load_zoo_results(store, folder)
    missing = [location for location in seen if location not in results]
    if len(missing) == len(seen):
        raise StoreError(f"{store.root}: no LoRA zoo for the seen locations; run `wildpdiff zoo` first")
    if missing:
        raise StoreError(
            f"{store.root}: the zoo is incomplete ({len(missing)} of {len(seen)} seen locations have no finished "
            f"run, first {missing[0]!r}); rerun `wildpdiff zoo` to finish it"
        )
    vectors, owner = [], []
    for index, location in enumerate(seen):
        for run in results[location]:
            for checkpoint in run["checkpoints"]:
                vectors.append(flatten(store.load_tensors(checkpoint["file"]), shapes))
                owner.append(index)
    return Zoo(list(seen), torch.stack(vectors), torch.tensor(owner)), results
