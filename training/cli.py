"""The `wildpdiff` command line (also `python -m training`).

    wildpdiff world    --profile demo --out data/demo
    wildpdiff pretrain --data data/demo --store model_store/demo [--profile demo]
    wildpdiff zoo      --data data/demo --store model_store/demo [--interval 10] [--workers 2]
    wildpdiff fit      --data data/demo --store model_store/demo [--force]
    wildpdiff generate --store model_store/demo --background frame.png --out adapter/ [--seed 0] [--steps 10]
                       [--shots a.png b.png --labels deer empty [--refine-steps 0]]
    wildpdiff evaluate --data data/demo --store model_store/demo [--ablation] [--scaling]
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
from pathlib import Path

from model_store.backbone import BACKBONE_FILE, open_clip_backbone
from model_store.generator import DEFAULT_FRAME_RULE, DEFAULT_STEPS, FRAME_RULES
from model_store.store import Store, StoreError
from training.data import CCTDataset, DataError, read_cct, scan_cct
from training.profiles import PROFILES, Profile, get_profile


def open_or_create_store(root: str, profile: Profile) -> Store:
    if (Path(root) / "manifest.json").exists():
        return Store(root)
    return Store.create(root, profile=profile.name)


def cmd_world(args: argparse.Namespace) -> None:
    from training.world import build_world

    profile = get_profile(args.profile)
    if args.seed is not None:
        profile.world.seed = args.seed
    start = time.perf_counter()
    tasks = build_world(profile.world, Path(args.out), progress=not args.quiet)
    counts = ", ".join(f"{len(tasks[role])} {role}" for role in ("pretrain", "seen", "interp", "unseen"))
    print(f"world written to {args.out} ({counts} locations) in {time.perf_counter() - start:.1f} s")


def _dataset(args: argparse.Namespace) -> CCTDataset:
    dataset = read_cct(args.data, tasks=args.tasks, backgrounds=args.backgrounds, classes=args.classes)
    print(dataset.summary())
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
    if dataset.background_root is not None or (dataset.root / "backgrounds").is_dir():
        return
    from training.backgrounds import write_backgrounds

    dataset.background_root = store.path("backgrounds")
    locations = [loc for role in ("seen", "interp", "unseen") for loc in dataset.locations(role)]
    written = write_backgrounds(dataset, dataset.background_root, locations, progress=not args.quiet)
    if written:
        store.register(*(str(path.relative_to(store.root)) for path in written))
        print(f"derived {len(written)} background frames of {len(locations)} locations into {dataset.background_root}")


def _apply_model_options(profile: Profile, args: argparse.Namespace) -> None:
    """--backbone / --condition flags -> the profile's configs (flags a stage lacks count as unset)."""
    backbone, weights = getattr(args, "backbone", None), getattr(args, "backbone_weights", None)
    mean, std = getattr(args, "image_mean", None), getattr(args, "image_std", None)
    if weights and not backbone:
        raise ValueError("--backbone-weights needs --backbone MODEL")
    if backbone:
        if not weights:
            raise ValueError("--backbone needs --backbone-weights PATH (a local checkpoint; nothing is downloaded)")
        profile.backbone = open_clip_backbone(backbone, weights, mean, std)
    else:
        profile.backbone.mean = tuple(mean or profile.backbone.mean)
        profile.backbone.std = tuple(std or profile.backbone.std)

    condition, condition_weights = getattr(args, "condition", None), getattr(args, "condition_weights", None)
    condition_mean, condition_std = getattr(args, "condition_mean", None), getattr(args, "condition_std", None)
    if not (condition or condition_weights):
        if condition_mean or condition_std:
            raise ValueError("--condition-mean/--condition-std need --condition MODEL")
        return
    if not (condition and condition_weights):
        raise ValueError("--condition and --condition-weights go together")
    tower = open_clip_backbone(condition, condition_weights, condition_mean, condition_std)
    profile.fit.condition.source = "open_clip"
    profile.fit.condition.tower = tower.to_dict()


def cmd_pretrain(args: argparse.Namespace) -> None:
    from training.pretrain import pretrain

    profile = get_profile(args.profile)
    _apply_model_options(profile, args)
    dataset = _dataset(args)
    store = open_or_create_store(args.store, profile)
    _adopt(dataset, store, args)
    if store.has(BACKBONE_FILE) and not args.force:
        print(f"{args.store} already holds a pretrained backbone; pass --force to train it again")
        return
    if args.steps is not None:
        profile.pretrain.steps = args.steps
    metrics = pretrain(dataset, store, profile.backbone, profile.pretrain, progress=not args.quiet)
    print(
        f"pretrained in {metrics['seconds']:.0f} s; mean val accuracy on seen locations {metrics['seen_val_mean']:.3f}"
    )


def cmd_zoo(args: argparse.Namespace) -> None:
    from training.zoo import collect_zoo

    profile = get_profile(args.profile)
    dataset = _dataset(args)
    store = Store.open(args.store, required=[BACKBONE_FILE])
    _adopt(dataset, store, args)
    zoo = profile.zoo
    for name in ("interval", "workers", "runs", "checkpoints"):
        if getattr(args, name) is not None:
            setattr(zoo, name, getattr(args, name))
    start = time.perf_counter()
    results = collect_zoo(dataset, store, zoo, profile.lora, progress=not args.quiet)
    seen = [r for loc in dataset.locations("seen") for r in results.get(loc, [])]
    gains = [max(c["test_acc"] for c in r["checkpoints"]) - r["pretrain_test_acc"] for r in seen]
    print(
        f"zoo: {sum(len(v) for v in results.values())} runs in {time.perf_counter() - start:.0f} s; "
        f"mean fine-tuning gain on seen locations {sum(gains) / max(1, len(gains)):+.3f}"
    )


def cmd_fit(args: argparse.Namespace) -> None:
    from training.fit import fit

    profile = get_profile(args.profile)
    _apply_model_options(profile, args)
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
    from model_store.adapt import FewShotConfig, adapt, labels_to_indices
    from model_store.backbone import preprocess
    from model_store.generator import Generator
    from model_store.lora import save_adapter_dir, unflatten
    from model_store.ood import load_fallback
    from training.data import read_image

    def read(path: str):
        image = read_image(Path(path))
        if image is None:
            raise ValueError(f"{path}: not a readable image")
        return image

    images = [read(path) for path in args.background]
    store = Store(args.store)
    generator = Generator.from_store(store)
    features, distance = generator.condition(generator.embed(images), args.frame_rule)
    metadata = generator.metadata(args.seed, args.steps, distance)
    metadata.update(background_frames=str(len(images)), frame_rule=args.frame_rule)
    if args.shots:
        labels = labels_to_indices(args.labels, generator.classes, len(args.shots))
        pixels = preprocess([read(path) for path in args.shots], generator.backbone_config)
        config = FewShotConfig(args.candidates, args.refine_steps)
        fallback = load_fallback(store)
        result = adapt(
            generator, features, pixels, labels, seed=args.seed, steps=args.steps, fallback=fallback, config=config
        )
        state = {k: v.contiguous() for k, v in unflatten(result.vector, generator.shapes).items()}
        metadata.update(result.metadata(), refine_steps=str(args.refine_steps))
        chosen = f"; chose {result.source} ({result.shot_acc:.0%} on {len(args.shots)} shots)"
    else:
        [vector] = generator.generate_vectors(features, [args.seed], args.steps)
        state = {k: v.contiguous() for k, v in unflatten(vector, generator.shapes).items()}
        chosen = ""
    save_adapter_dir(args.out, state, generator.layout, f"wildpdiff:{generator.store_id}", metadata)
    print(
        f"adapter written to {args.out} ({len(images)} background frame(s), {args.frame_rule} rule; seed {args.seed}, "
        f"{args.steps} steps, condition distance {distance:.2f}, "
        f"nearest seen location {generator.nearest_location(features)[0]}{chosen})"
    )
    threshold = store.manifest["components"]["condition"].get("ood_threshold")
    if threshold is not None and distance > threshold and not args.shots:
        print(
            f"warning: the background is out of distribution (distance {distance:.2f} > threshold {threshold:.2f}): "
            "a generated adapter can be worse than the pretrained model here; adapt with a few labelled frames "
            "(--shots ... --labels ... --refine-steps 10)",
            file=sys.stderr,
        )


def cmd_evaluate(args: argparse.Namespace) -> None:
    from model_store.generator import GENERATOR_FILES
    from training.evaluate import evaluate

    profile = get_profile(args.profile)
    dataset = _dataset(args)
    store = Store.open(args.store, required=GENERATOR_FILES)
    _adopt(dataset, store, args)
    start = time.perf_counter()
    report = evaluate(dataset, store, profile, ablation=args.ablation, scaling=args.scaling, progress=not args.quiet)
    means = ", ".join(
        f"{rq} generated {report[rq]['summary']['generated_acc']:.3f}"
        for rq in ("rq1", "rq2", "rq3")
        if report[rq]["per_task"]
    )
    print(f"report written to {store.path('report')} in {time.perf_counter() - start:.0f} s ({means})")


def cmd_pipeline(args: argparse.Namespace) -> None:
    from training.pipeline import run_pipeline

    profile = get_profile(args.profile)
    _apply_model_options(profile, args)
    dataset = _dataset(args)
    store = open_or_create_store(args.store, profile)
    _adopt(dataset, store, args)
    start = time.perf_counter()
    options = {"ablation": args.ablation, "scaling": args.scaling}
    run_pipeline(dataset, store, profile, options, progress=not args.quiet)
    print(f"pipeline finished in {time.perf_counter() - start:.0f} s; report in {store.path('report')}")


def cmd_backgrounds(args: argparse.Namespace) -> None:
    from training.backgrounds import write_backgrounds

    dataset = scan_cct(args.data)
    print(dataset.summary())
    locations = sorted(dataset.frames)
    written = write_backgrounds(dataset, Path(args.out), locations, force=args.force, progress=not args.quiet)
    print(f"{len(written)} background frames of {len({p.parent for p in written})} locations written to {args.out}")


def cmd_serve(args: argparse.Namespace) -> None:
    # Imported here: the service's dependencies are not needed by the training stages.
    import logging

    import uvicorn

    from app.main import create_app
    from app.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    given = {"store": args.store, "host": args.host, "port": args.port}
    settings = Settings(**{k: v for k, v in given.items() if v is not None})  # unset flags: env or defaults
    app = create_app(settings)  # a bad store raises StoreError here, before the port is bound
    uvicorn.run(app, host=settings.host, port=settings.port, timeout_graceful_shutdown=20)


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
            p.add_argument("--store", required=True, help="model store folder (created if missing)")
            p.add_argument("--tasks", metavar="FILE", help="location roles (default: DATA/tasks.json, else derived)")
            p.add_argument(
                "--classes", metavar="FILE", help="JSON list of the category names to keep (default: all)"
            )
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
    p.add_argument("--workers", type=int, help="worker processes (default 2)")
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
    p.add_argument(
        "--frame-rule",
        choices=FRAME_RULES,
        default=DEFAULT_FRAME_RULE,
        help=f"how several frames become one condition (default {DEFAULT_FRAME_RULE}: of their features)",
    )
    p.add_argument("--out", required=True, help="output folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"DDIM steps (default {DEFAULT_STEPS})")
    p.add_argument("--shots", nargs="+", default=[], help="labelled frames of the location: choose among candidates")
    p.add_argument("--labels", nargs="+", default=[], help="one class name per --shots file")
    p.add_argument("--candidates", type=int, default=16, help="generated candidates scored on the shots")
    p.add_argument("--refine-steps", type=int, default=0, help="gradient steps on the shots after choosing")
    p.set_defaults(func=cmd_generate)

    p = stage("evaluate", "RQ1-RQ3 with baselines, novelty and timing -> STORE/report/")
    p.add_argument("--ablation", action="store_true", help="also the saving-interval ablation (fits 3 generators)")
    p.add_argument("--scaling", action="store_true", help="also the seen-location scaling study (fits many)")
    p.set_defaults(func=cmd_evaluate)

    p = stage("pipeline", "pretrain -> zoo -> fit -> evaluate; a rerun skips what is up to date")
    p.add_argument("--ablation", action="store_true", help="evaluate with the saving-interval ablation")
    p.add_argument("--scaling", action="store_true", help="evaluate with the seen-location scaling study")
    backbone_options(p)
    condition_options(p)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser(
        "backgrounds",
        help="median background frames of every location from its empty frames",
        description="median background frames of every location from its empty train/val frames (DIR/<location>/)",
    )
    p.add_argument("--data", required=True, help="dataset folder in COCO Camera Traps layout")
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
    except (DataError, StoreError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
