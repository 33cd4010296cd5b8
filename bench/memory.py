"""Peak resident memory and CPU time of each pipeline stage, each run as its own `wildpdiff` process.

    python -m bench.memory --store model_store/demo --data data/demo [--full] [--out bench/results]

Always: the imports alone (the floor under every stage) and `wildpdiff generate` on the given store. With
`--full`, also every stage of a fresh smoke-profile pipeline (world, pretrain, zoo, fit, evaluate, generate)
in a temp folder. A stage's peak is that of its largest process (the zoo's workers are processes of their
own); see `bench.measure.run_measured`. The server's peak comes from `bench.service`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench.adaptation import DEFAULT_STEPS
from bench.measure import run_measured
from model_store.condition import split_backgrounds

WILDPDIFF = [sys.executable, "-m", "training"]


def first_fresh_background(data: Path) -> Path:
    tasks = json.loads((data / "tasks.json").read_text())
    location = tasks["seen"][0]
    return split_backgrounds(sorted((data / "backgrounds" / location).glob("*.png")))[1][0]


def generate_stage(store: Path, data: Path, work: Path, logs: Path) -> dict:
    command = [*WILDPDIFF, "generate", "--store", str(store), "--out", str(work / "adapter")]
    command += ["--background", str(first_fresh_background(data)), "--steps", str(DEFAULT_STEPS)]
    return run_measured(command, logs / "generate.log")


def smoke_pipeline(work: Path, logs: Path) -> dict[str, dict]:
    data, store = work / "data", work / "store"
    stages = {"world": [*WILDPDIFF, "world", "--profile", "smoke", "--out", str(data)]}
    for stage in ("pretrain", "zoo", "fit", "evaluate"):
        stages[stage] = [*WILDPDIFF, stage, "--data", str(data), "--store", str(store), "--profile", "smoke", "--quiet"]
    results = {name: run_measured(command, logs / f"smoke_{name}.log") for name, command in stages.items()}
    results["generate"] = generate_stage(store, data, work, logs)
    return results


def run(store: str, data: str, full: bool, out: Path) -> dict:
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wildpdiff-memory-") as tmp:
        # the floor under every stage: the interpreter with torch, open_clip, diffusers and peft imported
        imports = [sys.executable, "-c", "import model_store.generator"]
        result = {"imports": run_measured(imports, logs / "imports.log")}
        result["generate"] = generate_stage(Path(store), Path(data), Path(tmp), logs)
        if full:
            result["smoke_pipeline"] = smoke_pipeline(Path(tmp), logs)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--full", action="store_true", help="also every stage of a fresh smoke pipeline")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    result = run(args.store, args.data, args.full, Path(args.out))
    (Path(args.out) / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
