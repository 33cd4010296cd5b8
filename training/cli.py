"""The `wildpdiff` command line (also `python -m training`).

    wildpdiff world    --profile demo --out data/demo
    wildpdiff pretrain --data data/demo --store model_store/demo [--profile demo]
    wildpdiff zoo      --data data/demo --store model_store/demo [--interval 10] [--workers 2]
                       [--executor ray [--ray-address auto] [--run-cpus 1] [--run-gpus 0.25]]
    wildpdiff fit      --data data/demo --store model_store/demo [--force]
    wildpdiff generate --store model_store/demo --background frame.png --out adapter/ [--seed 0] [--steps 10]
                       [--method knn_blend] [--policy fallback] [--shots a.png b.png --labels deer empty]
    wildpdiff classify --store model_store/demo (--adapter FILE | --background IMG ...) --images CARD/
                       --out predictions.json [--top-k 3] [--batch-size 64]      (offline, no server)
    wildpdiff evaluate --data data/demo --store model_store/demo [--ablation] [--scaling] [--fit-seeds N]
    wildpdiff pipeline --data data/demo --store model_store/demo     (all stages; resumable)
    wildpdiff serve    --store model_store/demo [--host 127.0.0.1] [--port 8000]
    wildpdiff backgrounds --data DATA --out DIR [--force]        (median backgrounds of real data)

Real data (docs/recipes.md): any COCO Camera Traps folder; without tasks.json the roles are derived
and recorded in STORE/tasks.json (`--tasks FILE` overrides), and without backgrounds/ they are
derived into STORE/backgrounds/. Pretrained towers come from local files only: `--backbone MODEL
--backbone-weights PATH [--image-mean R G B --image-std R G B]`.

Every failure the user can cause (bad dataset, bad store, missing file) ends in one clear line on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from model_store.backbone import BACKBONE_FILE, open_clip_backbone
from model_store.store import Store, StoreError
from training import classify
from training.data import CCTDataset, DataError, DatasetSpec, read_dataset
from training.generate import generation_options
from training.profiles import PROFILES, Profile, get_profile
from training.tasks import assign_roles
from training.zoo import EXECUTORS, Executor, ExecutorError


def open_or_create_store(root: str, profile: Profile) -> Store:
    if (Path(root) / "manifest.json").exists():
        return Store(root)
    return Store.create(root, profile=profile.name)


def cmd_world(args: argparse.Namespace) -> None:
    from training.world import build_world

    profile = get_profile(args.profile)
    if args.seed is not None:
        profile = replace(profile, world=replace(profile.world, seed=args.seed))
    start = time.perf_counter()
    tasks = build_world(profile.world, Path(args.out), progress=not args.quiet)
    counts = ", ".join(f"{len(tasks[role])} {role}" for role in ("pretrain", "seen", "interp", "unseen"))
    print(f"world written to {args.out} ({counts} locations) in {time.perf_counter() - start:.1f} s")


def _dataset(args: argparse.Namespace) -> CCTDataset:
    """The one place the command line turns its flags into a DatasetSpec; every stage and worker reads through it."""
    spec = DatasetSpec(args.data, args.images, args.tasks, args.backgrounds, args.classes)
    dataset = read_dataset(spec)
    print(dataset.summary())
    dataset = assign_roles(dataset)
    for note in dataset.notes:
        print(f"note: {note}")
    return dataset


def _adopt(dataset: CCTDataset, store: Store, args: argparse.Namespace) -> None:
    """Record the roles in STORE/tasks.json; derive missing backgrounds into STORE/backgrounds/ (never into DATA)."""
    stored = store.manifest.get("classes")
    if stored and stored != dataset.categories:
        raise DataError(
            f"{store.root} was built with {len(stored)} classes {stored[:4]}..., the data now gives "
            f"{len(dataset.categories)} {dataset.categories[:4]}...: pass the same --classes on every stage"
        )
    if not store.has("tasks.json") or store.load_json("tasks.json") != dataset.tasks:
        store.save_json("tasks.json", dataset.tasks)
    if dataset.spec.backgrounds is not None or (dataset.root / "backgrounds").is_dir():
        return
    from training.backgrounds import write_backgrounds

    dataset.spec = replace(dataset.spec, backgrounds=store.path("backgrounds"))
    locations = [loc for role in ("seen", "interp", "unseen") for loc in dataset.locations(role)]
    written = write_backgrounds(dataset, dataset.spec.backgrounds, locations, progress=not args.quiet)
    if written:
        store.register(*(str(path.relative_to(store.root)) for path in written))
        print(f"derived {len(written)} background frames of {len(locations)} locations into {dataset.spec.backgrounds}")


def _apply_model_options(profile: Profile, args: argparse.Namespace) -> Profile:
    """The profile with the --backbone / --condition flags applied (flags a stage lacks count as unset)."""
    backbone, weights = getattr(args, "backbone", None), getattr(args, "backbone_weights", None)
    mean, std = getattr(args, "image_mean", None), getattr(args, "image_std", None)
    if weights and not backbone:
        raise ValueError("--backbone-weights needs --backbone MODEL")
    if backbone:
        if not weights:
            raise ValueError("--backbone needs --backbone-weights PATH (a local checkpoint; nothing is downloaded)")
        profile = replace(profile, backbone=open_clip_backbone(backbone, weights, mean, std))
    else:
        backbone_config = profile.backbone
        mean, std = tuple(mean or backbone_config.mean), tuple(std or backbone_config.std)
        profile = replace(profile, backbone=replace(backbone_config, mean=mean, std=std))

    condition, condition_weights = getattr(args, "condition", None), getattr(args, "condition_weights", None)
    condition_mean, condition_std = getattr(args, "condition_mean", None), getattr(args, "condition_std", None)
    if not (condition or condition_weights):
        if condition_mean or condition_std:
            raise ValueError("--condition-mean/--condition-std need --condition MODEL")
        return profile
    if not (condition and condition_weights):
        raise ValueError("--condition and --condition-weights go together")
    tower = open_clip_backbone(condition, condition_weights, condition_mean, condition_std)
    condition_config = replace(profile.fit.condition, source="open_clip", tower=tower.to_dict())
    return replace(profile, fit=replace(profile.fit, condition=condition_config))


def cmd_pretrain(args: argparse.Namespace) -> None:
    from training.pretrain import pretrain

    profile = get_profile(args.profile)
    profile = _apply_model_options(profile, args)
    dataset = _dataset(args)
    store = open_or_create_store(args.store, profile)
    _adopt(dataset, store, args)
    if store.has(BACKBONE_FILE) and not args.force:
        print(f"{args.store} already holds a pretrained backbone; pass --force to train it again")
        return
    config = profile.pretrain if args.steps is None else replace(profile.pretrain, steps=args.steps)
    metrics = pretrain(dataset, store, profile.backbone, config, progress=not args.quiet)
    print(
        f"pretrained in {metrics['seconds']:.0f} s; mean val accuracy on seen locations {metrics['seen_val_mean']:.3f}"
    )


def _executor(args: argparse.Namespace) -> Executor:
    """The zoo's executor from the flags, checked before any stage runs: a missing Ray fails now, not after pretrain."""
    ray_flags = {"--ray-address": args.ray_address, "--run-cpus": args.run_cpus, "--run-gpus": args.run_gpus}
    given = [flag for flag, value in ray_flags.items() if value is not None]
    if args.executor != "ray":
        if given:
            raise ValueError(f"{', '.join(given)} only apply to --executor ray")
        return Executor()
    from training.ray_executor import require_ray

    require_ray()
    set_flags = {"ray_address": args.ray_address, "run_cpus": args.run_cpus, "run_gpus": args.run_gpus}
    return Executor("ray", **{name: value for name, value in set_flags.items() if value is not None})


def cmd_zoo(args: argparse.Namespace) -> None:
    from training.ray_executor import job_runner
    from training.zoo import collect_zoo

    profile = get_profile(args.profile)
    executor = _executor(args)
    dataset = _dataset(args)
    store = Store.open(args.store, required=[BACKBONE_FILE])
    _adopt(dataset, store, args)
    options = ("interval", "workers", "runs", "checkpoints")
    zoo = replace(profile.zoo, **{name: getattr(args, name) for name in options if getattr(args, name) is not None})
    start = time.perf_counter()
    runner = job_runner(executor)
    results = collect_zoo(dataset, store, zoo, profile.lora, progress=not args.quiet, run_jobs=runner)
    seen = [r for loc in dataset.locations("seen") for r in results.get(loc, [])]
    gains = [max(c["test_acc"] for c in r["checkpoints"]) - r["pretrain_test_acc"] for r in seen]
    print(
        f"zoo: {sum(len(v) for v in results.values())} runs in {time.perf_counter() - start:.0f} s; "
        f"mean fine-tuning gain on seen locations {sum(gains) / max(1, len(gains)):+.3f}"
    )


def cmd_fit(args: argparse.Namespace) -> None:
    from training.fit import fit

    profile = get_profile(args.profile)
    profile = _apply_model_options(profile, args)
    dataset = _dataset(args)
    store = Store.open(args.store, required=[BACKBONE_FILE])
    _adopt(dataset, store, args)
    start = time.perf_counter()
    trained = fit(dataset, store, profile.fit, force=args.force, progress=not args.quiet)
    if not trained:
        print(f"{args.store} already holds a fitted generator; pass --force to fit it again")
        return
    found = store.manifest["components"]["condition"]["location_id"]
    print(
        f"fitted {', '.join(trained)} in {time.perf_counter() - start:.0f} s; one fresh background frame names its "
        f"location in {found['all']:.1%} of cases (day {found['day'] or 0:.1%}, night {found['night'] or 0:.1%})"
    )


def cmd_generate(args: argparse.Namespace) -> None:
    from training.generate import generate

    generate(args)


def at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def fit_seeds_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fit-seeds",
        type=at_least_one,
        default=1,
        help="also refit the denoiser with this many seeds (the store's own is the first) and report mean and spread",
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    from model_store.generator import GENERATOR_FILES
    from training.pipeline import evaluate_and_report

    profile = get_profile(args.profile)
    dataset = _dataset(args)
    store = Store.open(args.store, required=GENERATOR_FILES)
    _adopt(dataset, store, args)
    start = time.perf_counter()
    report = evaluate_and_report(
        dataset, store, profile, args.ablation, args.scaling, args.fit_seeds, progress=not args.quiet
    )
    means = ", ".join(
        f"{rq} generated {report[rq]['summary']['generated_acc']:.3f}"
        for rq in ("rq1", "rq2", "rq3")
        if report[rq]["per_task"]
    )
    print(f"report written to {store.path('report')} in {time.perf_counter() - start:.0f} s ({means})")


def cmd_pipeline(args: argparse.Namespace) -> None:
    from training.pipeline import run_pipeline

    profile = get_profile(args.profile)
    profile = _apply_model_options(profile, args)
    executor = _executor(args)
    dataset = _dataset(args)
    store = open_or_create_store(args.store, profile)
    _adopt(dataset, store, args)
    start = time.perf_counter()
    options = {"ablation": args.ablation, "scaling": args.scaling, "fit_seeds": args.fit_seeds, "executor": executor}
    run_pipeline(dataset, store, profile, options, progress=not args.quiet)
    print(f"pipeline finished in {time.perf_counter() - start:.0f} s; report in {store.path('report')}")


def cmd_backgrounds(args: argparse.Namespace) -> None:
    from training.backgrounds import write_backgrounds

    dataset = read_dataset(DatasetSpec(args.data, args.images))
    print(dataset.summary())
    locations = sorted(dataset.frames)
    written = write_backgrounds(dataset, Path(args.out), locations, force=args.force, progress=not args.quiet)
    print(f"{len(written)} background frames of {len({p.parent for p in written})} locations written to {args.out}")


def cmd_serve(args: argparse.Namespace) -> None:
    # Imported here: the service's dependencies are not needed by the training stages.
    import logging

    import uvicorn

    from app.drain import DrainingServer
    from app.main import create_app
    from app.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    given = {"store": args.store, "host": args.host, "port": args.port}
    settings = Settings(**{k: v for k, v in given.items() if v is not None})  # unset flags: env or defaults
    app = create_app(settings)  # a bad store raises StoreError here, before the port is bound
    # SIGTERM drains first (app/drain.py, up to drain_grace_s); uvicorn's own wait afterwards is only for stragglers.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, timeout_graceful_shutdown=1)
    DrainingServer(config, app.state.drain).run()


def images_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--images",
        metavar="DIR",
        help="folder the file_name paths of annotations.json are relative to "
        "(default: DATA, or DATA/images when the listed files are there)",
    )


def fraction(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def executor_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where the zoo's runs execute (docs/recipes.md: the zoo on a Ray cluster)")
    g.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="local: a process pool on this machine (--workers); ray: one Ray task per run (pip install '.[ray]')",
    )
    g.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="Ray cluster to join (auto, HOST:6379, ray://HOST:10001); default: start a local Ray on this machine. "
        "Every node must see DATA and STORE at the same paths",
    )
    g.add_argument("--run-cpus", type=fraction, metavar="N", help="CPUs per run (Ray; default 1)")
    g.add_argument("--run-gpus", type=fraction, metavar="N", help="GPUs per run, fractions allowed (Ray; default 0)")


def backbone_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pretrained backbone (local files only; nothing is downloaded)")
    g.add_argument(
        "--backbone",
        metavar="MODEL",
        help="open_clip model name (e.g. ViT-B-32) or an open_clip model config .json; "
        "default: the profile's small ViT trained from scratch",
    )
    g.add_argument("--backbone-weights", metavar="PATH", help="local open_clip checkpoint of MODEL (.safetensors)")
    g.add_argument(
        "--image-mean", type=float, nargs=3, metavar=("R", "G", "B"), help="input mean (with --backbone: OpenAI CLIP's)"
    )
    g.add_argument(
        "--image-std", type=float, nargs=3, metavar=("R", "G", "B"), help="input std (with --backbone: OpenAI CLIP's)"
    )


def condition_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("condition encoder (default: the backbone's tower; local files only)")
    g.add_argument(
        "--condition",
        metavar="MODEL",
        help="open_clip model name or config .json of a separate condition encoder (same features as the default)",
    )
    g.add_argument("--condition-weights", metavar="PATH", help="local open_clip checkpoint of the condition MODEL")
    g.add_argument(
        "--condition-mean", type=float, nargs=3, metavar=("R", "G", "B"), help="its input mean (OpenAI CLIP's)"
    )
    g.add_argument(
        "--condition-std", type=float, nargs=3, metavar=("R", "G", "B"), help="its input std (OpenAI CLIP's)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wildpdiff", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def stage(name: str, help_text: str, needs_data: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if needs_data:
            p.add_argument("--data", required=True, help="dataset folder in COCO Camera Traps layout")
            images_option(p)
            p.add_argument("--store", required=True, help="model store folder (created if missing)")
            p.add_argument("--tasks", metavar="FILE", help="location roles (default: DATA/tasks.json, else derived)")
            p.add_argument("--classes", metavar="FILE", help="JSON list of the category names to keep (default: all)")
            p.add_argument(
                "--backgrounds", metavar="DIR", help="<location>/*.png (default: DATA/backgrounds, else derived)"
            )
        p.add_argument("--profile", default="demo", choices=sorted(PROFILES), help="size profile (default: demo)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        return p

    p = stage("world", "write the synthetic camera-trap world in CCT layout", needs_data=False)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, help="world seed (default: the profile's)")
    p.set_defaults(func=cmd_world)

    p = stage("pretrain", "pretrain the backbone on the pretrain locations")
    p.add_argument("--steps", type=int, help="training steps (default: the profile's)")
    p.add_argument("--force", action="store_true", help="train again even if the store has a backbone")
    backbone_options(p)
    p.set_defaults(func=cmd_pretrain)

    p = stage("zoo", "fine-tune LoRA checkpoints per location (resumable)")
    p.add_argument("--interval", type=int, help="steps between saved checkpoints")
    p.add_argument("--checkpoints", type=int, help="checkpoints per run")
    p.add_argument("--runs", type=int, help="independent runs per seen location")
    p.add_argument("--workers", type=int, help="worker processes of the local executor (default 2)")
    executor_options(p)
    p.set_defaults(func=cmd_zoo)

    p = stage("fit", "fit the generator (condition embeddings, parameter VAE, denoiser) on the seen zoo")
    p.add_argument("--force", action="store_true", help="fit again even if the store holds a fitted generator")
    condition_options(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("generate", help="generate a PEFT LoRA adapter folder from background frame(s)")
    p.add_argument("--store", required=True, help="model store folder with a fitted generator")
    p.add_argument(
        "--background", required=True, nargs="+", help="background (empty) frame(s) of the location, e.g. day and night"
    )
    p.add_argument("--out", required=True, help="output folder (adapter_config.json + adapter_model.safetensors)")
    generation_options(p)
    p.add_argument("--shots", nargs="+", default=[], help="labelled frames of the location: choose among candidates")
    p.add_argument("--labels", nargs="+", default=[], help="one class name per --shots file")
    p.add_argument("--candidates", type=int, default=16, help="generated candidates scored on the shots")
    p.add_argument("--refine-steps", type=int, default=0, help="gradient steps on the shots after choosing")
    p.add_argument(
        "--frames",
        nargs="+",
        default=[],
        metavar="DIR_OR_FILE",
        help="unlabelled frames of the location (files, or folders of .png/.jpg/.jpeg/.webp/.gif): choose and adapt "
        "without labels, as the store's serving table says for the frame's region (ignored with --shots)",
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("classify", help=classify.HELP, description=classify.HELP)
    classify.add_arguments(p)
    p.set_defaults(func=classify.classify)

    p = stage("evaluate", "RQ1-RQ3 with baselines, novelty and timing -> STORE/report/")
    p.add_argument("--ablation", action="store_true", help="also the saving-interval ablation (fits 3 generators)")
    p.add_argument("--scaling", action="store_true", help="also the seen-location scaling study (fits many)")
    fit_seeds_option(p)
    p.set_defaults(func=cmd_evaluate)

    p = stage("pipeline", "pretrain -> zoo -> fit -> evaluate; a rerun skips what is up to date")
    p.add_argument("--ablation", action="store_true", help="evaluate with the saving-interval ablation")
    p.add_argument("--scaling", action="store_true", help="evaluate with the seen-location scaling study")
    fit_seeds_option(p)
    backbone_options(p)
    condition_options(p)
    executor_options(p)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser(
        "backgrounds",
        help="median background frames of every location from its empty frames",
        description="median background frames of every location from its empty train/val frames (DIR/<location>/)",
    )
    p.add_argument("--data", required=True, help="dataset folder in COCO Camera Traps layout")
    images_option(p)
    p.add_argument("--out", required=True, help="output folder (the dataset folder is never written to)")
    p.add_argument("--force", action="store_true", help="recompute locations that already have backgrounds in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_backgrounds)

    p = sub.add_parser("serve", help="serve the HTTP API", description="serve the HTTP API (settings: WILDPDIFF_*)")
    p.add_argument("--store", required=True, help="model store folder with a fitted generator")
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (DataError, StoreError, ExecutorError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
