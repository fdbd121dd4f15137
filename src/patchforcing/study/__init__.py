"""``patchforcing study``: the paper's comparisons on your data, in one command, with honest statistics.

Trains every *arm* (SiT, PFT with LTG, PFT with other timestep samplers: the same backbone, data
order, batch, steps, optimiser and EMA) for one or more training seeds, samples every run with
every sampler at every NFE budget from the same noise and labels, scores the samples in a feature
space (a classifier trained on the data, offline, or Inception) against held-out images, and
writes ``study.md`` (FD per arm x sampler x NFE with intervals and significance marks),
``study.json`` and figures. Modules: :mod:`.spec` (arms, configs, fairness), :mod:`.data` (real
images and labels), :mod:`.evaluate` (features, FD, bootstrap), :mod:`.compare` (intervals and
differences), :mod:`.report` (markdown, figures), :mod:`.runner` (:func:`run_study`).
"""

from .compare import summarize
from .data import RealSets, real_sets
from .evaluate import bootstrap_fd
from .runner import STUDY_FORMAT, StudyRun, check_shared_inputs, generation_spec, plan_runs, run_study
from .spec import (
    ARM_ALIASES,
    Arm,
    StudyError,
    StudySpec,
    arm_config,
    check_fair,
    parse_arm,
    parse_arms,
    parse_int_list,
    parse_name_list,
    run_id,
)

__all__ = [
    "ARM_ALIASES",
    "Arm",
    "RealSets",
    "STUDY_FORMAT",
    "StudyError",
    "StudyRun",
    "StudySpec",
    "arm_config",
    "bootstrap_fd",
    "check_fair",
    "check_shared_inputs",
    "generation_spec",
    "parse_arm",
    "parse_arms",
    "parse_int_list",
    "parse_name_list",
    "plan_runs",
    "real_sets",
    "run_id",
    "run_study",
    "summarize",
]
