"""How few sampling steps are enough: generated-adapter accuracy on the VAL splits of every evaluated role
(seen, interp, unseen) per step count, for the store's DDIM and for one cheaper sampler, with time per adapter.

    python -m bench.steps --data data/demo --store model_store/demo [--out bench/results/steps.json]
                          [--seeds 4] [--steps 1 2 3 4 5 10 20] [--samplers ddim ddim_leading dpm_solver] [--test]

The locations, their condition frame (the first held-out background frame) and their val/test splits come from
the evaluation package (`training.evaluation.targets.load_tasks`), scored with its one scorer of flat adapters
(`training.evaluation.scoring.Scorer`). Per location, `--seeds` adapters (seeds 0..n-1) are generated per
sampler and step count; a location's accuracy is the mean over its seeds. Every step count is compared with
DDIM at REFERENCE_STEPS (the service default when this was written) by the paired difference over locations
with a 95% bootstrap CI (`training.evaluation.roles.paired_difference`), per role and over all locations.

Samplers (all start from the same seeded noise, so a difference at a location is the sampler's, not the seed's):

    ddim          `Generator.generate_vectors` with the store's scheduler config: what the service runs
    ddim_leading  the same with timestep_spacing="leading" instead of the store's "trailing": a check of the
                  spacing, which decides where a 1-2 step sample starts (trailing: t=999, pure noise as trained;
                  leading: a 1-step sample's only timestep is t=0, so the denoiser is told the noise is clean)
    dpm_solver    DPM-Solver++(2M) on the same denoiser and timesteps: one denoiser pass per step, as DDIM, and
                  a second-order step from the previous x0 predictions (identical to DDIM at 1 and 2 steps)

Beside accuracy, per step count: the spread of a location's seeds (mean pairwise distance of their adapters in
z-scored coordinates) and the selection gain (the seed best on the even val frames, scored on the odd ones,
minus the seeds' mean there): few-shot, zero-label and best-of-n choices pick among generated candidates and
gain nothing when every seed gives the same adapter.

Recommendation (made on VAL only): per sampler, the fewest steps whose mean val accuracy over all val locations
is within TOLERANCE of the reference's; the paired CI says whether that is a statistical tie. `--test` also
scores the test splits; they are reported beside val, labelled, and never used to choose anything.

Timing: ms per adapter from condition features to flat adapter (scheduler set-up, sampling, VAE decode; the
frame embedding does not depend on the sampler and is measured once beside it), at batch 1 and per adapter at
batch 64, median of repeats, on ONE torch thread (as `wildpdiff evaluate` and bench.adaptation run). All
samplers are timed through one loop (`sample_with`); DDIM also through `Generator.generate_vectors` (served_*).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, SchedulerMixin

from bench.measure import clock, cpu_jiffies, load_average, machine, steal_share
from model_store.condition import standardize
from model_store.generator import Generator
from model_store.store import Store
from training.data import DatasetSpec, read_dataset
from training.evaluation.config import EvalConfig
from training.evaluation.roles import paired_difference
from training.evaluation.scoring import Scorer
from training.evaluation.stage import ROLES
from training.evaluation.targets import Task, load_tasks
from training.zoo import load_zoo_results

REFERENCE_STEPS = 10  # the service default when this study was asked for; fixed so the comparison does not drift
STEP_COUNTS = (1, 2, 3, 4, 5, 10, 20)
TOLERANCE = 0.003  # 0.3 accuracy points
REFERENCE_SAMPLER = "ddim"
ALL = "all"  # the pooled "role" of every val location
THREADS = 1
REPEATS_BATCH1, REPEATS_BATCH64 = 30, 7


# -----------------------------------------------------------------------------
# samplers: a diffusers scheduler per (store config, step count), run by one loop


def ddim(config: dict) -> DDIMScheduler:
    """The store's scheduler, as `Generator.generate_vectors` builds it: what the service runs."""
    return DDIMScheduler.from_config(config)


def ddim_leading(config: dict) -> DDIMScheduler:
    """The store's DDIM with only the timestep spacing changed."""
    return DDIMScheduler.from_config({**config, "timestep_spacing": "leading"})


def dpm_solver(config: dict) -> DPMSolverMultistepScheduler:
    """DPM-Solver++(2M) with the store's betas, prediction type and spacing. With a final sigma of zero diffusers
    makes the first step (no history yet) and the last step first-order whatever `lower_order_final` says, so at
    1 and 2 steps this IS DDIM; it differs from 3 steps on (lower_order_final=False keeps the others second-order)."""
    ddim_only = ("clip_sample", "clip_sample_range", "set_alpha_to_one")  # options DPMSolver does not have
    shared = {key: value for key, value in config.items() if not key.startswith("_") and key not in ddim_only}
    return DPMSolverMultistepScheduler(
        **shared, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=False, final_sigmas_type="zero"
    )


SAMPLERS: dict[str, Callable[[dict], SchedulerMixin]] = {
    "ddim": ddim,
    "ddim_leading": ddim_leading,
    "dpm_solver": dpm_solver,
}


@torch.no_grad()
def sample_with(
    generator: Generator, scheduler: SchedulerMixin, features: torch.Tensor, seeds: Sequence[int], steps: int
) -> torch.Tensor:
    """(B, D) features, B seeds -> (B, P) flat adapters: `Generator.generate_vectors` (from noise) with any
    diffusers scheduler, the same condition, seeded noise, residual base and retrieved neighbours, and no row blocking.
    `check_sample_with` asserts it reproduces the generator with the store's DDIM, so a sampler's difference is
    the scheduler's and not this loop's."""
    condition = standardize(features.to(generator.device), generator.condition_mean, generator.condition_std)
    noise = [
        torch.randn(generator.vae.latent_shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds
    ]
    noise = torch.stack(noise).to(generator.device)
    scheduler.set_timesteps(steps, device=generator.device)
    base = generator.blend_latents(features) if generator.residual else torch.zeros_like(noise)
    context = generator.denoiser_context(features)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        prediction = generator.denoiser(latents, t.expand(len(latents)), condition, **context)
        latents = scheduler.step(prediction, t, latents).prev_sample  # DDIM's default eta is 0, as served
    return generator.normalization.denormalize(generator.vae.decode(latents + base)).cpu()


def sampler_function(name: str) -> Callable[[Generator, torch.Tensor, Sequence[int], int], torch.Tensor]:
    """(generator, features, seeds, steps) -> flat adapters. "ddim" is the product path itself."""
    if name == REFERENCE_SAMPLER:
        return lambda generator, features, seeds, steps: generator.generate_vectors(features, seeds, steps)
    return lambda generator, features, seeds, steps: sample_with(
        generator, SAMPLERS[name](generator.scheduler_config), features, seeds, steps
    )


def check_sample_with(generator: Generator, features: torch.Tensor) -> float:
    """Max |difference| between `sample_with` + the store's DDIM and `Generator.generate_vectors`; raises
    above 1e-5 (the two may block rows differently, which moves the last bits only)."""
    seeds = list(range(len(features)))
    expected = generator.generate_vectors(features, seeds, REFERENCE_STEPS)
    got = sample_with(generator, ddim(generator.scheduler_config), features, seeds, REFERENCE_STEPS)
    difference = float((got - expected).abs().max())
    if difference > 1e-5:
        raise AssertionError(f"sample_with does not reproduce Generator.generate_vectors (max diff {difference})")
    return difference


# -----------------------------------------------------------------------------
# accuracy and spread per location


def accuracies(
    generator: Generator,
    scorer: Scorer,
    tasks: list[Task],
    sampler: str,
    steps: int,
    seeds: int,
    features: torch.Tensor,
    with_test: bool,
) -> list[dict]:
    """Per task: mean val (and test) accuracy of `seeds` generated adapters, and their spread: the mean
    pairwise distance between them in the VAE's z-scored coordinates (how different the seeds' adapters are,
    which best-of-n, few-shot and zero-label selection among generated candidates live on).

    One call for every task: an adapter's value does not depend on its batch beyond ~1e-7, far below a frame."""
    sample = sampler_function(sampler)
    vectors = sample(generator, features.repeat_interleave(seeds, 0), list(range(seeds)) * len(tasks), steps)
    vectors = vectors.float().view(len(tasks), seeds, -1)
    rows = []
    for task, adapters in zip(tasks, vectors, strict=True):
        wrong = scorer.wrong(adapters, task.val).double()  # (seeds, N)
        # Selection among the seeds, on val alone: pick on the even val frames by `select_sample`'s rule (best
        # accuracy, first on ties), score on the odd ones; the gain over the seeds' mean there is what the spread
        # is worth to best-of-n, few-shot and zero-label choices.
        pick = int((1 - wrong[:, 0::2].mean(1)).argmax())
        held = 1 - wrong[:, 1::2].mean(1)
        row = {
            "location": task.location,
            "role": task.role,
            "val_acc": float(1 - wrong.mean()),
            "spread": float(torch.pdist(generator.normalization.normalize(adapters)).mean()),
            "selection_gain": float(held[pick] - held.mean()),
        }
        if with_test:
            row["test_acc"] = float(scorer.accuracy(adapters, task.test).mean())
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# timing


def timings(
    generator: Generator, samplers: Sequence[str], features: torch.Tensor, step_counts: Sequence[int]
) -> dict[str, dict[int, dict]]:
    """Per sampler and step count: median ms per adapter at batch 1 and at batch 64, from one location's (1, D)
    features, fresh seeds per call, scheduler set-up included (as served).

    Every sampler runs through `sample_with`, so samplers and step counts compare on one loop; DDIM also through
    the served path (`served_*`: `Generator.generate_vectors`, whose cost also depends on how it blocks rows).
    The calls go in rounds over every configuration rather than one configuration after another: on shared
    cores the speed drifts within a run, and rounds spread the drift over all of them alike."""
    calls = {}  # (sampler, steps, field, batch) -> sample(rows, seeds)
    for name in samplers:
        for steps in step_counts:

            def loop(rows: torch.Tensor, seeds: list[int], name: str = name, steps: int = steps) -> torch.Tensor:
                return sample_with(generator, SAMPLERS[name](generator.scheduler_config), rows, seeds, steps)

            def served(rows: torch.Tensor, seeds: list[int], steps: int = steps) -> torch.Tensor:
                return generator.generate_vectors(rows, seeds, steps)

            for batch, field in ((1, "ms_batch1"), (64, "ms_per_adapter_batch64")):
                calls[name, steps, field, batch] = loop
                if name == REFERENCE_SAMPLER:
                    calls[name, steps, f"served_{field}", batch] = served
    seconds = {key: [] for key in calls}
    for round_ in range(-1, REPEATS_BATCH1):  # round -1 warms every configuration up
        for (name, steps, field, batch), sample in calls.items():
            if batch > 1 and round_ >= REPEATS_BATCH64:
                continue
            rows, seeds = features.expand(batch, -1), list(range((round_ + 1) * batch, (round_ + 2) * batch))
            start = time.perf_counter()
            sample(rows, seeds)
            if round_ >= 0:
                seconds[name, steps, field, batch].append((time.perf_counter() - start) / batch)
    out = {name: {steps: {} for steps in step_counts} for name in samplers}
    for (name, steps, field, _), values in seconds.items():
        out[name][steps][field] = 1000 * statistics.median(values)
    return out


def embedding_seconds(generator: Generator, task: Task, repeats: int) -> float:
    generator.embed([task.frame])  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        generator.embed([task.frame])
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


# -----------------------------------------------------------------------------
# summaries


def mean_by_role(rows: list[dict], field: str) -> dict[str, float]:
    roles = [role for role in ROLES.values() if any(row["role"] == role for row in rows)]
    means = {role: statistics.fmean(row[field] for row in rows if row["role"] == role) for role in roles}
    return means | {ALL: statistics.fmean(row[field] for row in rows)}


def paired_by_role(rows: list[dict], reference: list[dict], config: EvalConfig) -> dict[str, dict]:
    """Per role and over all locations: val accuracy minus the reference's, paired by location, 95% CI."""
    against = {row["location"]: row["val_acc"] for row in reference}
    out = {}
    for role in [*dict.fromkeys(row["role"] for row in rows), ALL]:
        diffs = [row["val_acc"] - against[row["location"]] for row in rows if role in (ALL, row["role"])]
        out[role] = paired_difference(diffs, config.bootstrap, config.seed)
    return out


def verdict(paired: dict) -> str:
    """What the CI says about a difference: a tie (0 inside), better or worse."""
    low, high = paired["ci95"]
    return "tie" if low <= 0 <= high else ("better" if low > 0 else "worse")


def fewest_steps_within(val_by_steps: dict[int, float], reference_val: float, tolerance: float) -> int | None:
    """The fewest steps whose mean val accuracy is at least `reference_val - tolerance` (None: no such count).
    Same rule as bench.adaptation.recommend_steps, against a reference that may be another sampler's."""
    within = [steps for steps, val in val_by_steps.items() if val >= reference_val - tolerance]
    return min(within) if within else None


# -----------------------------------------------------------------------------


def summarise(per_location: dict, timing: dict, config: EvalConfig, with_test: bool) -> dict[str, dict]:
    """Per sampler and step count: mean val accuracy and spread per role, paired val differences to the
    reference (and, for another sampler, to DDIM at the same steps), times; test only as a labelled report."""
    reference = per_location[REFERENCE_SAMPLER][REFERENCE_STEPS]
    reference_spread = statistics.fmean(row["spread"] for row in reference)
    table = {}
    for name, by_steps in per_location.items():
        table[name] = {}
        for steps, rows in by_steps.items():
            entry = {"val_acc": mean_by_role(rows, "val_acc")}
            entry["paired_val_vs_reference"] = paired_by_role(rows, reference, config)
            entry["verdict_vs_reference"] = verdict(entry["paired_val_vs_reference"][ALL])
            if name != REFERENCE_SAMPLER:  # the sampler's own gain at equal cost
                entry["paired_val_vs_ddim_same_steps"] = paired_by_role(
                    rows, per_location[REFERENCE_SAMPLER][steps], config
                )[ALL]
            entry["spread"] = mean_by_role(rows, "spread")
            entry["selection_gain"] = mean_by_role(rows, "selection_gain")
            entry["spread_vs_reference"] = entry["spread"][ALL] / reference_spread
            if with_test:
                entry["test_acc_report_only"] = mean_by_role(rows, "test_acc")
            table[name][steps] = entry | {key: round(value, 3) for key, value in timing[name][steps].items()}
    return table


def recommend(table: dict[str, dict]) -> dict[str, dict]:
    """Per sampler: the fewest steps within TOLERANCE of the reference's mean val accuracy over all locations."""
    reference_val = table[REFERENCE_SAMPLER][REFERENCE_STEPS]["val_acc"][ALL]
    out = {}
    for name, by_steps in table.items():
        steps = fewest_steps_within({s: e["val_acc"][ALL] for s, e in by_steps.items()}, reference_val, TOLERANCE)
        entry = by_steps.get(steps)
        out[name] = {
            "steps": steps,
            "val_acc": entry and entry["val_acc"][ALL],
            "paired_val_vs_reference": entry and entry["paired_val_vs_reference"][ALL],
            "verdict": entry and entry["verdict_vs_reference"],
            "spread_vs_reference": entry and entry["spread_vs_reference"],
        }
    return out


def run(data: str, store_path: str, seeds: int, step_counts: Sequence[int], samplers: Sequence[str], with_test: bool):
    torch.set_num_threads(THREADS)
    config = EvalConfig()
    step_counts = sorted({*step_counts, REFERENCE_STEPS})
    samplers = list(dict.fromkeys([REFERENCE_SAMPLER, *samplers]))
    steal_start = cpu_jiffies()
    with clock() as total:
        store = Store(store_path)
        dataset = read_dataset(DatasetSpec.of_store(data, store))
        generator = Generator.from_store(store)
        scorer = Scorer(generator.classifier, generator.layout, generator.shapes)
        results = load_zoo_results(store)
        backbone = generator.backbone_config
        tasks = [task for role in ROLES.values() for task in load_tasks(dataset, role, results, backbone)]
        features = generator.embed([task.frame for task in tasks]).float()
        harness_difference = check_sample_with(generator, features[:4])
        with clock() as accuracy_clock:
            per_location = {
                name: {
                    s: accuracies(generator, scorer, tasks, name, s, seeds, features, with_test) for s in step_counts
                }
                for name in samplers
            }
        with clock() as timing_clock:
            timing = timings(generator, samplers, features[:1], step_counts)
            embed_ms = 1000 * embedding_seconds(generator, tasks[0], REPEATS_BATCH1)

    table = summarise(per_location, timing, config, with_test)
    return {
        "settings": {
            "store_id": generator.store_id,
            "scheduler_config": generator.scheduler_config,
            "threads": THREADS,
            "seeds": seeds,
            "step_counts": step_counts,
            "reference": f"{REFERENCE_SAMPLER} at {REFERENCE_STEPS} steps",
            "tolerance": TOLERANCE,
            "bootstrap": config.bootstrap,
            "locations": {role: sum(task.role == role for task in tasks) for role in ROLES.values()},
            "val_frames_per_location": statistics.fmean(len(task.val.labels) for task in tasks),
            "timing": (
                f"features -> flat adapter through one sampling loop (sample_with), median of {REPEATS_BATCH1} "
                f"(batch 1) / {REPEATS_BATCH64} (batch 64) calls; served_*: Generator.generate_vectors"
            ),
            "spread": "mean pairwise distance between a location's seeds' adapters, z-scored coordinates",
            "selection_gain": "val accuracy on the odd val frames of the seed best on the even ones, minus the mean",
            "test": "reported only, never used to choose" if with_test else "not scored",
            "sample_with_max_diff_vs_generator": harness_difference,
        },
        "machine": machine() | {"load_after": load_average(), "steal_share": steal_share(steal_start, cpu_jiffies())},
        "clock": {"total": total.to_dict(), "accuracy": accuracy_clock.to_dict(), "timing": timing_clock.to_dict()},
        "embed_ms_batch1": round(embed_ms, 3),
        "samplers": {name: {str(s): entry for s, entry in rows.items()} for name, rows in table.items()},
        "recommendation": recommend(table),
        "per_location": {name: {str(s): rows for s, rows in by.items()} for name, by in per_location.items()},
    }


# -----------------------------------------------------------------------------
# markdown


def percent(value: float) -> str:
    return f"{100 * value:.2f}"


def difference(paired: dict) -> str:
    low, high = paired["ci95"]
    return f"{100 * paired['diff']:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


def markdown(result: dict) -> str:
    settings = result["settings"]
    roles = [role for role, count in settings["locations"].items() if count]
    with_test = settings["test"] != "not scored"
    lines = [
        f"Val accuracy (%) of generated adapters: mean over locations of the mean over {settings['seeds']} seeds. "
        f"Δ: paired difference to {settings['reference']} over locations, 95% bootstrap CI, in points. Spread: "
        f"{settings['spread']}, relative to the reference. Selection gain (points): {settings['selection_gain']}. "
        f"Time ({settings['threads']} torch thread): "
        f"{settings['timing']}; embedding the frame adds {result['embed_ms_batch1']:.2f} ms. Locations: "
        + ", ".join(f"{role} {settings['locations'][role]}" for role in roles)
        + ".",
        "",
        "| sampler | steps | " + " | ".join(f"val {role}" for role in roles) + " | val all | Δ val all [95% CI] | CI "
        "| spread | selection gain | ms batch 1 | ms/adapter batch 64 |"
        + (" test all (report only) |" if with_test else ""),
        "|---|---:|" + "---:|" * len(roles) + "---:|---|---|---:|---:|---:|---:|" + ("---:|" if with_test else ""),
    ]
    for name, by_steps in result["samplers"].items():
        for steps, entry in by_steps.items():
            cells = [name, steps, *(percent(entry["val_acc"][role]) for role in roles), percent(entry["val_acc"][ALL])]
            cells += [difference(entry["paired_val_vs_reference"][ALL]), entry["verdict_vs_reference"]]
            cells += [f"{entry['spread_vs_reference']:.2f}", f"{100 * entry['selection_gain'][ALL]:+.2f}"]
            cells += [f"{entry['ms_batch1']:.2f}"]
            cells += [f"{entry['ms_per_adapter_batch64']:.3f}"]
            if with_test:
                cells.append(percent(entry["test_acc_report_only"][ALL]))
            lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    lines += ["", f"Δ val per role vs {settings['reference']} (points, 95% CI):", ""]
    lines += ["| sampler | steps | " + " | ".join(roles) + " |", "|---|---:|" + "---|" * len(roles)]
    for name, by_steps in result["samplers"].items():
        for steps, entry in by_steps.items():
            paired = entry["paired_val_vs_reference"]
            lines.append(f"| {name} | {steps} | " + " | ".join(difference(paired[role]) for role in roles) + " |")
    reference_rows = result["samplers"][REFERENCE_SAMPLER]
    others = [name for name in result["samplers"] if name != REFERENCE_SAMPLER]
    if others:
        lines += ["", "Δ val all of a sampler vs DDIM at the same steps (points, 95% CI):", ""]
        lines += ["| sampler | " + " | ".join(f"{steps} steps" for steps in reference_rows) + " |"]
        lines += ["|---|" + "---|" * len(reference_rows)]
        for name in others:
            cells = [difference(entry["paired_val_vs_ddim_same_steps"]) for entry in result["samplers"][name].values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "DDIM through the served path (`Generator.generate_vectors`, its row blocking included):", ""]
    lines += ["| steps | ms batch 1 | ms/adapter batch 64 |", "|---:|---:|---:|"]
    for steps, entry in reference_rows.items():
        lines.append(f"| {steps} | {entry['served_ms_batch1']:.2f} | {entry['served_ms_per_adapter_batch64']:.3f} |")
    lines += [
        "",
        f"Recommendation (fewest steps within {100 * settings['tolerance']:.1f} points of the reference, val):",
    ]
    for name, choice in result["recommendation"].items():
        if choice["steps"] is None:
            lines.append(f"- {name}: no step count is within the tolerance")
            continue
        lines.append(
            f"- {name}: {choice['steps']} steps, val all {percent(choice['val_acc'])}, "
            f"Δ {difference(choice['paired_val_vs_reference'])}: {choice['verdict']}, "
            f"spread {choice['spread_vs_reference']:.2f}x the reference's"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", default="bench/results/steps.json")
    parser.add_argument("--seeds", type=int, default=4, help="generated adapters per location and step count")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEP_COUNTS))
    parser.add_argument("--samplers", nargs="+", choices=sorted(SAMPLERS), default=list(SAMPLERS))
    parser.add_argument("--test", action="store_true", help="also score the test splits (reported, never chosen on)")
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds must be at least 2: the spread and the selection gain compare a location's seeds")
    result = run(args.data, args.store, args.seeds, args.steps, args.samplers, args.test)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\n{out}; {result['clock']['total']['seconds']:.0f} s in all")


if __name__ == "__main__":
    main()
