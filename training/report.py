"""`report.md` and the plots of STORE/report/, written from the evaluation's report dict.

The markdown leads with the paper's table (Pretrain / Fine-tuned / Generated / delta) per research question,
then the baselines, plain statements of whether generation beats each cheap alternative, novelty, timing,
the saving-interval ablation and the seen-location scaling. "Beats" means the mean paired difference over a
role's locations is above two standard errors and at least one point; "ties" means it is within that.
"""

from __future__ import annotations

import io
import math
import statistics

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from model_store.store import Store, atomic_write_bytes  # noqa: E402
from training.data import CCTDataset  # noqa: E402
from training.zoo import Zoo  # noqa: E402

TITLES = {
    "rq1": "RQ1: seen locations",
    "rq2": "RQ2: interpolated locations (between two seen ones)",
    "rq3": "RQ3: unseen locations",
}
BASELINES = ("average", "nearest", "knn_blend", "hypernet", "noise", "gaussian", "midpoint")
CHALLENGERS = ("average", "nearest", "knn_blend", "hypernet")  # what generation must beat to be worth it


def write(store: Store, report: dict, zoo: Zoo, generated: dict[str, torch.Tensor], dataset: CCTDataset) -> None:
    files = {
        "report.md": markdown(report).encode(),
        "pca.png": pca_plot(zoo, generated, dataset),
        "accuracy.png": accuracy_plot(report),
    }
    if report["ablation"]["saving_interval"]:
        files["ablation.png"] = ablation_plot(report["ablation"])
    if report["scaling"]:
        files["scaling.png"] = scaling_plot(report["scaling"])
    for name, data in files.items():
        atomic_write_bytes(store.path(f"report/{name}"), data)
    store.register(*(f"report/{name}" for name in files))


# -----------------------------------------------------------------------------
# markdown


def pct(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def points(value) -> str:
    return "-" if value is None else f"{100 * value:+.1f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def delta(row: dict):
    if row.get("generated_acc") is None or row.get("finetuned_acc") is None:
        return None
    return row["generated_acc"] - row["finetuned_acc"]


def main_table(section: dict) -> list[str]:
    def line(name: str, row: dict) -> list[str]:
        return [
            name,
            pct(row["pretrain_acc"]),
            pct(row["finetuned_acc"]),
            pct(row["finetuned_best_acc"]),
            pct(row["generated_acc"]),
            pct(row["generated_selected_acc"]),
            points(delta(row)),
        ]

    header = ["Task", "Pretrain", "Fine-tuned", "FT best (val)", "Generated", "Gen. selected (val)", "Δ gen − FT"]
    rows = [line(row["task"], row) for row in section["per_task"]]
    rows.append(line("**mean**", section["summary"]))
    return table(header, rows)


def baseline_table(section: dict) -> list[str]:
    names = [b for b in BASELINES if b in section["summary"]["baselines"]]
    rows = [
        [row["task"], pct(row["generated_acc"]), *(pct(row["baselines"][b]) for b in names)]
        for row in section["per_task"]
    ]
    summary = section["summary"]
    rows.append(["**mean**", pct(summary["generated_acc"]), *(pct(summary["baselines"][b]) for b in names)])
    return table(["Task", "Generated", *names], rows)


def verdict(section: dict, baseline: str) -> str:
    """One plain sentence: does generation beat `baseline` on this role's locations (paired over locations)?"""
    diffs = [row["generated_acc"] - row["baselines"][baseline] for row in section["per_task"]]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    margin = max(2 * se, 0.01)  # and at least one point: a few test frames are not a finding
    word = "beats" if mean > margin else "is worse than" if mean < -margin else "only ties"
    wins = sum(d > 0 for d in diffs)
    return (
        f"generation {word} {baseline}: {pct(section['summary']['generated_acc'])} vs "
        f"{pct(section['summary']['baselines'][baseline])} ({points(mean)} points, standard error "
        f"{100 * se:.1f}; better at {wins} of {len(diffs)} locations)"
    )


PAIRED = ("served", "anchored", "generated", "generated_selected", "nearest", "hypernet", "average", "midpoint",
          "finetuned")  # fmt: skip


def paired_table(summary: dict) -> list[str]:
    """Each method's mean and its paired difference to knn_blend with the 95% bootstrap interval."""
    rows = [["knn_blend", pct(summary["baselines"]["knn_blend"]), "", ""]]
    for name in PAIRED:
        entry = summary["paired"].get(name)
        if entry is None:
            continue
        low, high = entry["ci95"]
        verdict_ = "above" if low > 0 else "below" if high < 0 else "tie"
        mean = summary["baselines"].get(name, summary.get(f"{name}_acc"))
        rows.append([name, pct(mean), f"{points(entry['diff'])} [{points(low)}, {points(high)}]", verdict_])
    return table(["Method", "Accuracy", "minus knn_blend [95% CI]", "reading"], rows)


def serving_section(report: dict) -> list[str]:
    """What the store serves per region of condition distance, and how every method compares with knn_blend."""
    serving = report.get("serving")
    if not serving:
        return []
    lines = [
        "## What the store serves",
        "",
        f"Chosen on {serving['chosen_on']}: knn_blend k={serving['knn_blend']['k']} "
        f"({serving['knn_blend']['weighting']}); anchored = DDIM started from that blend at strength "
        f"{serving['anchored']['strength']:g}.",
        "",
    ]
    lines += table(
        ["Region", "Condition distance up to", "Method served", "Evaluated locations there"],
        [
            [r["region"], "-" if r["max_distance"] is None else f"{r['max_distance']:.2f}", r["method"],
             str(r.get("locations", "-"))]
            for r in serving["regions"]
        ],
    )  # fmt: skip
    lines += [
        "",
        "Per role: each method's mean test accuracy and its paired difference to knn_blend (chosen per role on "
        "val), with a 95% bootstrap interval over locations. `served` = what the table above serves each location.",
        "",
    ]
    for rq, title in TITLES.items():
        summary = report[rq]["summary"]
        if summary and summary.get("paired"):
            lines += [f"### {title}", "", *paired_table(summary), ""]
    return lines


def fit_seeds_section(study: dict) -> list[str]:
    """Mean and spread over denoiser fit seeds of what matters for new locations."""
    if len(study.get("seeds", [])) < 2:
        return []
    lines = [
        f"## Fit seeds ({len(study['seeds'])} denoisers)",
        "",
        "The denoiser refitted with each seed (seed "
        f"{', '.join(str(r['seed']) for r in study['seeds'])}; everything else is the store's). Mean ± standard "
        "deviation over seeds; paired differences are method minus knn_blend.",
        "",
    ]
    rows = []
    for rq, title in TITLES.items():
        mean, std = study["mean"].get(rq), study["std"].get(rq)
        if not mean:
            continue

        def cell(value, spread):
            return f"{pct(value)} ± {100 * spread:.1f}"

        rows.append(
            [
                title.split(":")[0],
                *(cell(mean.get(f), std.get(f, 0.0)) for f in ("served_acc", "anchored_acc", "generated_acc")),
                cell(mean["knn_blend_acc"], std["knn_blend_acc"]),
                *(
                    f"{points(mean['paired'].get(n))} ± {100 * std['paired'].get(n, 0.0):.1f}"
                    for n in ("served", "anchored", "generated")
                ),
            ]
        )
    header = ["Role", "Served", "Anchored", "Generated", "knn_blend", "Served − blend", "Anchored − blend",
              "Generated − blend"]  # fmt: skip
    return [*lines, *table(header, rows), ""]


def zerolabel_section(rows: list[dict]) -> list[str]:
    """Unlabelled frames (`training.evaluation.zerolabel`): per role and frame count, against no frames."""
    if not rows:
        return []
    lines = [
        "## Zero labels",
        "",
        "Unlabelled train frames of each location (their labels never read); per distance region the option "
        "(off / select / adapt / select+adapt) chosen on val at the middle frame count, applied from the fewest "
        "frames at which val never says it loses. Regret: best candidate minus the one chosen to start from "
        "(test, reported only). Seconds: median time of one answer with frames (one thread).",
        "",
    ]
    lines += table(
        ["Split", "Frames", "Options by region", "No frames", "With frames", "Δ [95% CI]", "Gain recovered", "Regret",
         "Seconds"],  # fmt: skip
        [
            [
                r["split"],
                str(r["frames"]),
                ", ".join(f"{region}: {option}" for region, option in sorted(r["options"].items())),
                pct(r["default_acc"]),
                pct(r["acc"]),
                f"{points(r['paired']['diff'])} [{points(r['paired']['ci95'][0])}, {points(r['paired']['ci95'][1])}]",
                f"{r['gain_recovered']:.2f}",
                points(r["regret"]),
                f"{r['seconds']:.2f}",
            ]
            for r in rows
        ],
    )
    return [*lines, ""]


def novelty_words(ratio: float) -> str:
    if ratio < 0.5:
        return "close to a training checkpoint (replica-like)"
    if ratio < 1.5:
        return "about as new as one more fine-tuning step"
    return "far from every training checkpoint"


def markdown(report: dict) -> str:
    settings = report["settings"]
    lines = [
        "# Wild-P-Diff evaluation",
        "",
        f"Store `{settings['store_id']}` (profile `{settings['profile']}`): generator trained on "
        f"{settings['seen_locations']} seen locations, {settings['zoo_checkpoints']} zoo checkpoints of "
        f"{settings['adapter_parameters']} LoRA parameters. Accuracies in % on each location's test split.",
        f"Condition: the {settings['condition']}. Generated = mean of {settings['samples']} adapters sampled "
        f"from it (DDIM, {settings['steps']} steps); Gen. selected = the {settings['generated_selected']}; "
        f"FT best = the {settings['finetuned_best']}. Nothing is chosen on test.",
        "On interp and unseen locations Fine-tuned is a reference LoRA trained there; neither the generator "
        "nor any baseline saw it.",
        "",
    ]
    for rq, title in TITLES.items():
        section = report[rq]
        if not section["per_task"]:
            continue
        lines += [f"## {title}", "", *main_table(section), ""]
        if "by_similarity" in section:
            for level, summary in section["by_similarity"].items():
                base = summary["baselines"]
                lines.append(
                    f"- {level}-similarity pairs: generated {pct(summary['generated_acc'])}, fine-tuned "
                    f"{pct(summary['finetuned_acc'])}, midpoint oracle {pct(base.get('midpoint'))}, "
                    f"knn_blend {pct(base['knn_blend'])}, nearest {pct(base['nearest'])}"
                )
            lines.append("")
        if rq == "rq3" and section["summary"].get("ood_auroc") is not None:
            lines += [
                f"Out-of-distribution signal: `Generator.distance` separates unseen locations' frames from seen "
                f"locations' held-out frames with AUROC {section['summary']['ood_auroc']:.3f}.",
                "",
            ]

    lines += serving_section(report)
    lines += ["## Baselines", ""]
    lines.append(
        "average = mean of all seen checkpoints (ignores the frame); nearest = mean adapter of the seen location "
        "whose stored embedding is closest to the frame's; knn_blend = distance-weighted mix of the k nearest "
        "locations' adapters; hypernet = MLP regression from the same features to the adapter, trained on the same "
        "pairs; noise = a nearest-location checkpoint plus Gaussian noise; gaussian = per-coordinate Gaussian fitted "
        "to the nearest location's checkpoints; midpoint (interp only, an oracle) = mean of the two source "
        "locations' adapters."
    )
    lines.append("")
    for rq, title in TITLES.items():
        section = report[rq]
        if not section["per_task"]:
            continue
        selection = section["selection"]
        lines += [
            f"### {title}",
            "",
            f"Chosen on val: knn_blend `{selection['knn_blend']}`, noise sigma {selection['noise_sigma']:g} "
            "(z-score units).",
            "",
            *baseline_table(section),
            "",
            *(f"- {verdict(section, b)}." for b in CHALLENGERS if b in section["summary"]["baselines"]),
            "",
        ]

    lines += ["## Novelty of generated adapters", ""]
    rows = []
    for rq, title in TITLES.items():
        summary = report[rq]["summary"]
        if summary:
            ratio = summary["novelty"]["nn_l2_ratio"]
            rows.append(
                [title.split(":")[0], f"{summary['novelty']['max_iou']:.3f}", f"{ratio:.2f}", novelty_words(ratio)]
            )
    lines += table(["Role", "max IoU of errors", "NN L2 ratio", "reading"], rows)
    lines += [
        "",
        "max IoU: highest overlap of the generated adapter's wrong test predictions with a training checkpoint's "
        f"({settings['max_iou']}; 1 = same mistakes). NN L2 ratio: distance to the nearest training checkpoint "
        "over the median distance between neighbouring training checkpoints (z-scored weights); on this "
        f"scale neighbouring seen locations' mean adapters are {settings['location_spacing_ratio']:.1f} apart.",
        "",
    ]

    timing = report["timing"]
    lines += [
        "## Timing",
        "",
        f"One fine-tuning run: {timing['finetune_seconds_per_task']:.1f} s; one generated adapter (batch 1, "
        f"{settings['steps']} DDIM steps, CPU): {timing['generate_seconds_per_adapter'] * 1000:.0f} ms; "
        f"speed-up {timing['speedup']:.0f}x.",
        "",
    ]
    if timing.get("fewshot_seconds_per_adaptation"):
        per_option = ", ".join(
            f"{seconds * 1000:.0f} ms with {steps} refinement steps"
            for steps, seconds in sorted(timing["fewshot_seconds_per_adaptation"].items(), key=lambda kv: int(kv[0]))
        )
        lines[-1:-1] = [f"One few-shot adaptation (candidates scored on the shots, median): {per_option}."]

    ablation = report["ablation"]
    if ablation["saving_interval"]:
        lines += ["## Ablation: saving interval", "", ablation.get("setup", ""), ""]
        lines += table(
            ["Interval", "Fine-tuned", "Generated", "Δ"],
            [
                [str(r["interval"]), pct(r["finetuned_acc"]), pct(r["generated_acc"]), points(delta(r))]
                for r in ablation["saving_interval"]
            ],
        )
        lines.append("")
    lines += fit_seeds_section(report.get("fit_seeds", {}))
    if report["scaling"]:
        lines += ["## Scaling with the number of seen locations", "", settings.get("scaling", ""), ""]
        lines += table(
            ["Seen", "Seed", "RQ2 generated", "RQ2 knn_blend", "RQ3 generated", "RQ3 nearest"],
            [
                [
                    str(r["n_seen"]),
                    str(r["seed"]),
                    pct(r["rq2_generated_acc"]),
                    pct(r["rq2_knn_blend_acc"]),
                    pct(r["rq3_generated_acc"]),
                    pct(r["rq3_nearest_acc"]),
                ]
                for r in report["scaling"]
            ],
        )
        lines.append("")
    if report["fewshot"]:
        lines += ["## Few-shot", ""]
        lines += table(
            ["Split", "Shots per class", "Refinement steps (chosen on val)", "Accuracy", "Gain recovered"],
            [
                [r["split"], str(r["shots"]), str(r["refine_steps"]), pct(r["acc"]), f"{r['gain_recovered']:.2f}"]
                for r in report["fewshot"]
            ],
        )
        lines.append("")
    lines += zerolabel_section(report.get("zerolabel", []))
    if report.get("representation"):
        lines += ["## Task representation", ""]
        lines += [
            "How the condition is formed: one held-out frame, several (mean of their features, or the frame "
            "closest to the training frames), a night-infrared frame alone or with daytime frames. Mean accuracy "
            "of the sampled adapters.",
            "",
        ]
        lines += table(
            ["Role", "Condition", "Locations", "Val", "Test"],
            [
                [r["role"], r["variant"], str(r["locations"]), pct(r["val_acc"]), pct(r["test_acc"])]
                for r in report["representation"]
            ],
        )
        lines.append("")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# plots


def png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


def pca_plot(zoo: Zoo, generated: dict[str, torch.Tensor], dataset: CCTDataset) -> bytes:
    """Zoo checkpoints and generated adapters in the first two principal components of the (z-scored) zoo."""
    center = zoo.vectors.mean(0)
    z = (zoo.vectors - center) / zoo.scale
    _, _, v = torch.pca_lowrank(z, q=2, center=False)
    project = lambda x: (((x - center) / zoo.scale) @ v).numpy()  # noqa: E731
    colours = plt.get_cmap("hsv")
    figure, ax = plt.subplots(figsize=(8, 6.5))
    n = len(zoo.locations)
    owner = (zoo.owner / n).numpy()
    ax.scatter(*project(zoo.vectors).T, c=colours(owner), s=8, alpha=0.5, label="zoo checkpoints (by location)")
    role_of = {loc: role for role in ("seen", "interp", "unseen") for loc in dataset.locations(role)}
    marks = {"seen": ("x", None), "interp": ("^", "black"), "unseen": ("s", "dimgray")}
    for role, (marker, colour) in marks.items():
        for i, (location, vectors) in enumerate((k, g) for k, g in generated.items() if role_of.get(k) == role):
            c = colours(zoo.locations.index(location) / n) if colour is None else colour
            label = f"generated ({role})" if i == 0 else None
            ax.scatter(*project(vectors).T, marker=marker, color=c, s=30, label=label)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("LoRA adapters: zoo checkpoints and generated samples")
    ax.legend(loc="best", fontsize=8)
    return png(figure)


def accuracy_plot(report: dict) -> bytes:
    series = [
        ("pretrain", lambda r: r["pretrain_acc"]),
        ("fine-tuned", lambda r: r["finetuned_acc"]),
        ("generated", lambda r: r["generated_acc"]),
        ("nearest", lambda r: r["baselines"]["nearest"]),
        ("knn_blend", lambda r: r["baselines"]["knn_blend"]),
    ]
    sections = [(rq, report[rq]) for rq in TITLES if report[rq]["per_task"]]
    figure, axes = plt.subplots(len(sections), 1, figsize=(16, 3.2 * len(sections)), squeeze=False)
    width = 0.8 / len(series)
    for ax, (rq, section) in zip(axes[:, 0], sections, strict=True):
        rows = section["per_task"]
        for j, (name, get) in enumerate(series):
            values = [get(r) if get(r) is not None else 0.0 for r in rows]
            ax.bar([i + j * width for i in range(len(rows))], values, width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [r["task"] for r in rows], rotation=90)
        ax.set_ylim(0, 1)
        ax.set_ylabel("test accuracy")
        ax.set_title(TITLES[rq])
    axes[0, 0].legend(ncol=len(series), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.12))
    figure.tight_layout()
    return png(figure)


def ablation_plot(ablation: dict) -> bytes:
    rows = ablation["saving_interval"]
    figure, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in (("finetuned_acc", "fine-tuned"), ("generated_acc", "generated")):
        ax.plot([r["interval"] for r in rows], [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("saving interval (steps)")
    ax.set_ylabel("test accuracy (seen)")
    ax.set_title("Saving-interval ablation")
    ax.legend()
    return png(figure)


def scaling_plot(scaling: list[dict]) -> bytes:
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    panels = (
        ("RQ2 interp", ("rq2_generated_acc", "generated"), ("rq2_knn_blend_acc", "knn_blend")),
        ("RQ3 unseen", ("rq3_generated_acc", "generated"), ("rq3_nearest_acc", "nearest")),
    )
    for ax, (title, *lines) in zip(axes, panels, strict=True):
        for key, label in lines:
            sizes = sorted({r["n_seen"] for r in scaling})
            means = [statistics.fmean(r[key] for r in scaling if r["n_seen"] == n) for n in sizes]
            ax.scatter([r["n_seen"] for r in scaling], [r[key] for r in scaling], alpha=0.4, s=12)
            ax.plot(sizes, means, marker="o", label=label)
        ax.set_xlabel("seen locations")
        ax.set_ylabel("test accuracy")
        ax.set_title(title)
        ax.legend()
    figure.tight_layout()
    return png(figure)
