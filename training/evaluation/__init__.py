"""Evaluation as a leaf: it reads the dataset, the zoo and the store, and never trains a stage.

    config     what an evaluation runs with
    scoring    labelled frames, the one scorer of flat adapters, val-only selection
    targets    the target locations (condition frame, splits, references)
    baselines  cheap alternatives and novelty metrics, from the seen zoo
    roles      one research question: generation beside every baseline, paired differences
    serving    what the store serves per region of condition distance, chosen on val
    fewshot, representation, signals   leaves: few-shot adaptation, task representation, OOD AUROC, timing
    zerolabel  unlabelled frames: each region's zero-label option, chosen on val
    stage      the stage: every section, the serving table written into the store
"""
