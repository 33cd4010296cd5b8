"""The one-command pipeline: pretrain -> zoo -> fit -> evaluate -> studies -> report.

    wildpdiff pipeline --data data/demo --store model_store/demo [--profile demo]

Resumable. Before a stage runs, its key is computed: a hash of its resolved config, the dataset's
annotations file and location roles, and the sha256 of every store file it reads. The manifest
records, per stage, the key and whether the stage finished (`manifest["pipeline"]`). On a rerun a
stage is
- skipped when it finished with the same key;
- resumed when it started with the same key but did not finish (the zoo and fit resume inside);
- redone from scratch when its key changed (its stale outputs are removed first); and since a redone
  stage writes new files, the keys of the stages after it change too;
- adopted when it has no record but its outputs exist (a store built with the single-stage commands):
  the backbone is kept, the zoo and fit are resumed.
Options that change where work runs, not its result (the zoo's executor), are in no key.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from model_store.backbone import BACKBONE_FILE
from model_store.inference import SERVING_FILE
from model_store.store import Store
from training import report as report_files
from training import studies
from training.common import config_key
from training.data import CCTDataset
from training.evaluation.stage import evaluate
from training.profiles import Profile
from training.ray_executor import job_runner
from training.zoo import Executor

REPORT = "report"
EVALUATION_OUTPUTS = (f"{REPORT}/", SERVING_FILE, "fit_seeds/", "ablation/", "scaling/")
RESULT_OPTIONS = ("ablation", "scaling", "fit_seeds")  # the options evaluation's result depends on


@dataclass
class Stage:
    name: str
    config: Callable[[Profile, dict], dict]  # (profile, options) -> what its result depends on besides files
    inputs: Callable[[Store], list[str]]  # the store files it reads
    run: Callable[[CCTDataset, Store, Profile, dict, bool, bool], None]  # (..., options, fresh, progress)


def files_under(store: Store, *prefixes: str) -> list[str]:
    return sorted(relpath for relpath in store.manifest["files"] if relpath.startswith(prefixes))


def forget(store: Store, folder: str) -> None:
    """Delete a folder of the store and drop its files from the manifest (stale outputs of a redone stage)."""
    for relpath in files_under(store, f"{folder}/"):
        del store.manifest["files"][relpath]
    store.update()  # writes the manifest
    shutil.rmtree(store.path(folder), ignore_errors=True)


# -----------------------------------------------------------------------------
# the stages


def run_pretrain(dataset, store, profile, options, fresh, progress) -> None:
    from training.pretrain import pretrain

    if fresh or not store.has(BACKBONE_FILE):
        pretrain(dataset, store, profile.backbone, profile.pretrain, progress=progress)


def run_zoo(dataset, store, profile, options, fresh, progress) -> None:
    from training.zoo import collect_zoo

    if fresh:
        forget(store, profile.zoo.folder)
    runner = job_runner(options["executor"])
    collect_zoo(dataset, store, profile.zoo, profile.lora, progress=progress, run_jobs=runner)


def run_fit(dataset, store, profile, options, fresh, progress) -> None:
    from training.fit import fit

    fit(dataset, store, profile.fit, force=fresh, progress=progress)


def run_evaluate(dataset, store, profile, options, fresh, progress) -> None:
    evaluate_and_report(
        dataset, store, profile, options["ablation"], options["scaling"], options["fit_seeds"], progress
    )


def evaluate_and_report(
    dataset: CCTDataset,
    store: Store,
    profile: Profile,
    ablation: bool = False,
    scaling: bool = False,
    fit_seeds: int = 1,
    progress: bool = True,
) -> dict:
    """evaluate -> the studies asked for (each fits extra generators; without them, the results of an earlier
    run that did are kept) -> STORE/report/{report.json, report.md, *.png}; returns the report."""
    evaluation = evaluate(dataset, store, profile.evaluate, progress)
    if fit_seeds > 1:
        sections = {rq: evaluation.report[rq] for rq in ("rq1", "rq2", "rq3")}
        study = studies.fit_seeds(dataset, store, fit_seeds, profile.fit, profile.evaluate, sections, progress)
        store.save_json(f"{REPORT}/fit_seeds.json", study)
    if ablation:
        study = studies.saving_interval_ablation(
            dataset, store, profile.ablation, profile.zoo, profile.fit, profile.evaluate, progress
        )
        store.save_json(f"{REPORT}/ablation.json", study)
    if scaling:
        rows = studies.seen_scaling(dataset, store, profile.scaling, profile.fit, profile.evaluate, progress)
        store.save_json(f"{REPORT}/scaling.json", {"scaling": rows, "setup": studies.scaling_setup(profile.scaling)})
    report = evaluation.report
    report["ablation"] = previous(store, "ablation.json", {"saving_interval": [], "setup": ""})
    report["fit_seeds"] = previous(store, "fit_seeds.json", {"seeds": [], "mean": {}, "std": {}})
    scaling_result = previous(store, "scaling.json", {"scaling": [], "setup": ""})
    report["scaling"] = scaling_result["scaling"]
    report["settings"]["scaling"] = scaling_result["setup"]
    store.save_json(f"{REPORT}/report.json", report)
    report_files.write(store, report, evaluation.zoo, evaluation.generated, dataset)
    return report


def previous(store: Store, name: str, default):
    """The ablation or scaling result of the latest `--ablation` / `--scaling` run, if any."""
    return store.load_json(f"{REPORT}/{name}") if store.has(f"{REPORT}/{name}") else default


STAGES = (
    Stage(
        "pretrain",
        config=lambda p, o: {"backbone": asdict(p.backbone), "pretrain": asdict(p.pretrain)},
        inputs=lambda store: [],
        run=run_pretrain,
    ),
    Stage(
        "zoo",
        config=lambda p, o: {"zoo": asdict(p.zoo), "lora": asdict(p.lora)},
        inputs=lambda store: [BACKBONE_FILE],
        run=run_zoo,
    ),
    Stage(
        "fit",
        config=lambda p, o: {"fit": asdict(p.fit)},
        inputs=lambda store: [BACKBONE_FILE, *files_under(store, "zoo/")],
        run=run_fit,
    ),
    Stage(
        "evaluate",
        config=lambda p, o: {
            "evaluate": asdict(p.evaluate),
            **{name: o[name] for name in RESULT_OPTIONS},
            **({"ablation": asdict(p.ablation)} if o["ablation"] else {}),
            **({"scaling": asdict(p.scaling)} if o["scaling"] else {}),
        },
        # everything the store holds except what evaluation itself writes
        inputs=lambda store: [f for f in store.manifest["files"] if not f.startswith(EVALUATION_OUTPUTS)],
        run=run_evaluate,
    ),
)


# -----------------------------------------------------------------------------
# keys and the runner


def data_fingerprint(dataset: CCTDataset) -> dict[str, str]:
    """The annotations file and the location roles (from tasks.json or derived); image files are not hashed.
    (Other `--classes` than the store's are refused before any stage runs: training.cli `_adopt`.)"""
    return {
        "annotations": hashlib.sha256((dataset.root / "annotations.json").read_bytes()).hexdigest(),
        "roles": hashlib.sha256(json.dumps(dataset.tasks, sort_keys=True).encode()).hexdigest(),
    }


def stage_key(stage: Stage, dataset: CCTDataset, store: Store, profile: Profile, options: dict) -> str:
    inputs = {relpath: store.manifest["files"][relpath]["sha256"] for relpath in stage.inputs(store)}
    return config_key(stage.config(profile, options), inputs, data_fingerprint(dataset))


def run_pipeline(
    dataset: CCTDataset,
    store: Store,
    profile: Profile,
    options: dict | None = None,
    stages: tuple[Stage, ...] = STAGES,
    progress: bool = True,
) -> dict[str, str]:
    """Run every stage that is not finished with its current key; returns {stage: "skipped" | "ran"}."""
    options = {"ablation": False, "scaling": False, "fit_seeds": 1, "executor": Executor(), **(options or {})}
    store.remove_temp_files()  # what a killed run left midway through a write
    done: dict[str, str] = {}
    for stage in stages:
        key = stage_key(stage, dataset, store, profile, options)
        record = store.manifest.get("pipeline", {}).get(stage.name)
        if record and record["key"] == key and record["done"]:
            done[stage.name] = "skipped"
            print(f"{stage.name}: up to date, skipped")
            continue
        fresh = record is not None and record["key"] != key
        set_record(store, stage.name, {"key": key, "done": False})
        start = time.perf_counter()
        print(f"{stage.name}: {'redoing (inputs or config changed)' if fresh else 'running'}")
        stage.run(dataset, store, profile, options, fresh, progress)
        seconds = time.perf_counter() - start
        finished = datetime.now(UTC).isoformat(timespec="seconds")
        set_record(store, stage.name, {"key": key, "done": True, "seconds": seconds, "finished": finished})
        done[stage.name] = "ran"
        print(f"{stage.name}: done in {seconds:.0f} s")
    return done


def set_record(store: Store, name: str, record: dict) -> None:
    store.update(pipeline={**store.manifest.get("pipeline", {}), name: record})
