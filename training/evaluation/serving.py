"""What the store serves: per region of condition distance, the method that scored best on VAL.

The service sees a frame's condition distance (`Generator.distance`, ~1 typical of the training frames),
never a location's role, so the choice is made by distance region:

    seen     distance <= midpoint of the median distance of the seen and of the interp locations' frames
    between  distance <= the store's calibrated OOD threshold
    ood      beyond it

In each region, among `generate`, `anchored` (DDIM started from the knn_blend adapter), `knn_blend` and
`nearest`, the method with the best mean val accuracy over the evaluated locations (of every role) whose
condition falls in the region; ties go to the cheaper method. knn_blend's k and weighting are chosen on the
val splits of every evaluated location, the anchored strength on those of the new (interp and unseen)
locations. Test labels are read only to report what was chosen (`served_acc`).
"""

from __future__ import annotations

import math
import statistics

from model_store.inference import ServingTable
from training.evaluation.config import EvalConfig
from training.evaluation.roles import KNN_SEPARATOR, summarise_role

METHODS = ("knn_blend", "nearest", "anchored", "generate")  # tie order: cheapest first
NEW_LOCATIONS = ("rq2", "rq3")


def anchored_names(config: EvalConfig) -> list[str]:
    return [f"anchored@{strength:g}" for strength in config.anchored.strengths]


def choose_strength(sections: dict, config: EvalConfig) -> float:
    """The anchored strength with the best mean val accuracy over the new locations (all locations if none)."""
    rows = [row for rq in NEW_LOCATIONS for row in sections.get(rq, {}).get("per_task", [])]
    rows = rows or [row for section in sections.values() for row in section["per_task"]]
    best = max(anchored_names(config), key=lambda name: statistics.fmean(row["methods"][name]["val"] for row in rows))
    return float(best.removeprefix("anchored@"))


def region_bounds(sections: dict, ood_threshold: float | None) -> list[tuple[str, float | None]]:
    """[(region, max_distance)], the last unbounded."""

    def median_distance(rq: str) -> float | None:
        rows = sections.get(rq, {}).get("per_task", [])
        return statistics.median(row["condition_distance"] for row in rows) if rows else None

    seen, interp = median_distance("rq1"), median_distance("rq2")
    bounds: list[tuple[str, float | None]] = []
    if seen is not None and interp is not None and interp > seen:
        bounds.append(("seen", (seen + interp) / 2))
    if ood_threshold is not None and (not bounds or ood_threshold > bounds[-1][1]):
        bounds.append(("between", ood_threshold))
        bounds.append(("ood", None))
    else:
        bounds.append(("between" if bounds else "all", None))
    return bounds


def choose_serving(
    sections: dict, config: EvalConfig, knn_choice: str, ood_threshold: float | None, has_location_means: bool
) -> ServingTable:
    """The serving table of the store, chosen on val (module docstring)."""
    strength = choose_strength(sections, config)
    k, weighting = knn_choice.removeprefix("k=").split(KNN_SEPARATOR)
    methods = METHODS if has_location_means else ("generate",)
    rows = [row for section in sections.values() for row in section["per_task"]]
    regions, lower = [], float("-inf")
    for region, upper in region_bounds(sections, ood_threshold):
        inside = [r for r in rows if lower < r["condition_distance"] <= (math.inf if upper is None else upper)]
        if inside:
            method = max(methods, key=lambda m: statistics.fmean(val_of(r, m, strength) for r in inside))
        else:  # no evaluated location there: the blend, which cannot fall far below the zoo
            method = methods[0]
        regions.append({"region": region, "max_distance": upper, "method": method, "locations": len(inside)})
        lower = upper if upper is not None else lower
    return ServingTable.from_dict(
        {
            "version": 1,
            "regions": regions,
            "knn_blend": {"k": int(k), "weighting": weighting},
            "anchored": {"strength": strength, "steps": config.steps},
            "chosen_on": "val splits of the evaluated seen, interp and unseen locations (one fresh frame each)",
        }
    )


def method_name(method: str, strength: float) -> str:
    return f"anchored@{strength:g}" if method == "anchored" else method


def val_of(row: dict, method: str, strength: float) -> float:
    return row["methods"][method_name(method, strength)]["val"]


def apply_serving(sections: dict, table: ServingTable, config: EvalConfig) -> None:
    """Add to every row what the store serves there (`region`, `served_method`, `served_acc`) and the anchored
    method at the chosen strength (`anchored_acc`), then recompute the role summaries."""
    strength = table.anchored_strength
    for section in sections.values():
        if not section["per_task"]:
            continue
        for row in section["per_task"]:
            region, method = table.method_for(row["condition_distance"])
            row["anchored_acc"] = row["methods"][method_name("anchored", strength)]["test"]
            row["region"], row["served_method"] = region, method
            row["served_acc"] = row["methods"][method_name(method, strength)]["test"]
        section.update(summarise_role(section["per_task"], config))
