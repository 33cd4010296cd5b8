"""Few-shot evaluation: how much of the fine-tuning gain a few labelled frames recover (report.json `fewshot`).

Per interp / unseen location and per budget k in `shots` (labelled frames PER CLASS): draw k frames of each
class from the location's TRAIN split, let `model_store.adapt.adapt` choose (and optionally refine) an
adapter on them, and score it on the TEST split. How many refinement steps (`refine_steps` options) is
chosen per role and budget by the mean accuracy on the locations' VAL split, never on test. Per role and budget:

    gain_recovered = (acc - pretrain) / (finetuned - pretrain)

on the role's means (per-location gains can be near zero, and a ratio of means does not blow up).
`finetuned` is the mean test accuracy of the reference LoRAs fine-tuned there, as in rq2/rq3.
"""

from __future__ import annotations

import statistics
import time

import torch

from model_store.adapt import FewShotConfig, adapt
from training.data import CCTDataset
from training.evaluation.config import FewShotEvalConfig
from training.evaluation.scoring import Scorer, load_frames

ROLES = {"interp": "rq2", "unseen": "rq3"}


def draw_shots(labels: torch.Tensor, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of up to `per_class` random frames of each class present in `labels`."""
    picks = []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        picks.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(picks).sort().values


def evaluate_fewshot(
    dataset: CCTDataset, generator, fallback, sections: dict, tasks: dict, steps: int, config: FewShotEvalConfig
) -> tuple[list[dict], dict[str, float]]:
    """-> (fewshot rows, {refine steps: median seconds per adaptation}). `tasks`: role -> that role's `Task`s
    (`training.evaluation.targets`); `sections`: the report's rq sections, for pretrain and fine-tuned accuracy."""
    scorer = Scorer(generator.classifier, generator.layout, generator.shapes)
    rows, seconds = [], {}
    for role, rq in ROLES.items():
        by_location = {row["task"]: row for row in sections[rq]["per_task"]}
        role_tasks = [task for task in tasks.get(role, []) if task.location in by_location][: config.max_locations]
        if not role_tasks:
            continue
        pretrain = statistics.fmean(by_location[t.location]["pretrain_acc"] for t in role_tasks)
        finetuned = statistics.fmean(by_location[t.location]["finetuned_acc"] for t in role_tasks)
        for per_class in config.shots:
            # per option: (val accuracies, test accuracies) over the role's locations
            scores = {steps_: ([], []) for steps_ in config.refine_steps}
            for task in role_tasks:
                train = load_frames(dataset, task.location, "train", generator.backbone_config)
                pick = draw_shots(train.labels, per_class, torch.Generator().manual_seed(config.seed))
                for refine_steps in config.refine_steps:
                    start = time.perf_counter()
                    result = adapt(
                        generator,
                        generator.embed([task.frame]),
                        train.pixels[pick],
                        train.labels[pick],
                        seed=config.seed,
                        steps=steps,
                        fallback=fallback,
                        config=FewShotConfig(config.candidates, refine_steps),
                    )
                    seconds.setdefault(refine_steps, []).append(time.perf_counter() - start)
                    scores[refine_steps][0].append(scorer.accuracy(result.vector[None], task.val).item())
                    scores[refine_steps][1].append(scorer.accuracy(result.vector[None], task.test).item())
            chosen = max(config.refine_steps, key=lambda option: statistics.fmean(scores[option][0]))
            acc = statistics.fmean(scores[chosen][1])
            gain = finetuned - pretrain
            rows.append(
                {
                    "split": role,
                    "shots": per_class,
                    "acc": acc,
                    "pretrain_acc": pretrain,
                    "finetuned_acc": finetuned,
                    "gain_recovered": (acc - pretrain) / gain if gain > 0 else float("nan"),
                    "locations": len(role_tasks),
                    "refine_steps": chosen,
                    "val_acc": {str(option): statistics.fmean(scores[option][0]) for option in config.refine_steps},
                }
            )
    return rows, {str(option): statistics.median(times) for option, times in seconds.items()}
