"""How fast each method's weight update grows over the first steps of a long-preset run (the short-budget lag, #14).

The long grid (``reproduce.py --preset long``) shows AdaLoRA behind scaled LoRA on CoLA for the first ~600
steps, with the same lag when nothing is pruned (``svd_lora_init_r``). This script trains the first ``--steps``
optimizer steps of the same runs (same configs, seeds, schedules and learning-rate warm-up: the run is simply
stopped early) and records, every ``--every`` steps, the size of the update the adapters have learned,
``||delta W||_F / ||W||_F`` averaged over the adapted matrices, and the training loss. It prints a table and
writes JSON::

    python benchmarks/update_scale.py --task cola --seed 1 \\
        --methods adalora adalora_orthogonal_init svd_lora_init_r lora_scaled --steps 400 --every 50

Real MiniLM (or ``--backbone``) and the real train set (``--data-dir``, default ``../shared/data/glue``); a few
minutes a method on 2 CPU cores.

``--preset short`` probes the runs of the short-budget study (issue #25: ``reproduce.py --preset short``, the
189-step grid) instead, any of its methods, e.g. each faster-starting option against AdaLoRA and scaled LoRA over
the whole run; every option this script does not know is reproduce.py's and defines the runs as there
(``--lr-ratio-b``, ``--lr-ratio-e``, ``--combo``, ``--lr``, ``--method-lr``; ``--out``, ``--results-dir`` and
``--tag`` say where ``lora_from_pattern`` finds its adalora run's rank pattern)::

    python benchmarks/update_scale.py --preset short --task cola --seed 1 --steps 189 --every 21 \\
        --methods adalora adalora_lr_plus adalora_rslora adalora_weight_svd adalora_combo lora_scaled \\
        --lr-ratio-b 4

For a weight-SVD start (``adapter_init weight_svd``) the update counted is the one learned since the start,
``delta W - delta W_0`` relative to the pretrained ``W`` (the base weight holds the residual ``W - delta W_0``, and
the adapter starts at the principal components ``delta W_0``), so the rows compare like with like.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reproduce  # noqa: E402


class UpdateNorms(Callback):
    """Every ``every`` optimizer steps, the mean relative update size of the adapters and the loss; stops the fit
    after ``stop_at`` steps."""

    def __init__(self, every: int, stop_at: int) -> None:
        self.every, self.stop_at = every, stop_at
        self.records: list[dict[str, float]] = []

    @torch.no_grad()
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step >= self.stop_at:
            ratios = [relative_update(a) for a in pl_module.adapters.values()]
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.records.append({"step": step, "relative_update": sum(ratios) / len(ratios), "loss": float(loss)})
        if step >= self.stop_at:
            trainer.should_stop = True


@torch.no_grad()
def relative_update(adapter: torch.nn.Module) -> float:
    """``||learned update||_F / ||W||_F`` of one adapted layer, W the pretrained weight.

    For the reference and orthogonal starts the adapter's product starts at 0 and the base weight is W, so this is
    ``||delta_weight()|| / ||base weight||``. A weight-SVD start's product starts at its principal components
    ``initial_delta()`` and its base weight is the residual, so the learned update is the difference from that start
    and W is residual + start: otherwise the row would show the size of W's top components, not of the learning.
    """
    delta, weight = adapter.delta_weight(), adapter.base_layer.weight
    initial = adapter.initial_delta() if hasattr(adapter, "initial_delta") else None
    if initial is not None:
        initial = initial.to(delta.device)
        delta = delta.double() - initial
        weight = weight.double() + adapter._orient(initial)  # the weight's layout (Conv1D keeps it transposed)
    return float(delta.norm() / weight.norm())


def probe(method: str, task: str, seed: int, args: argparse.Namespace,
          grid: argparse.Namespace) -> tuple[list[dict], LightningModule]:
    """The first ``args.steps`` steps of the run ``(method, task, seed)`` of ``grid`` (a ``reproduce.parse_args``
    Namespace: the long preset's, or the short one's): the records of :class:`UpdateNorms` and the module as
    training left it.

    Raises:
        SystemExit: ``lora_from_pattern`` without its adalora run's rank pattern (:func:`reproduce.rank_pattern_file`).
    """
    from adalora_pl.cli import main

    with tempfile.TemporaryDirectory() as out:
        callback = json.dumps({"class_path": "update_scale.UpdateNorms",
                               "init_args": {"every": args.every, "stop_at": args.steps}})
        logger = json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": out}})
        cli = main(["fit", "--config", str(reproduce.REPO / "configs" / f"{task}.yaml"),
                    "--trainer.default_root_dir", out, "--trainer.enable_progress_bar", "false",
                    "--trainer.logger", logger, "--trainer.limit_val_batches", "0",
                    "--trainer.num_sanity_val_steps", "0", "--trainer.callbacks+", callback,
                    *reproduce.location_args(task, grid), *reproduce.pattern_args(method, task, seed, grid),
                    *reproduce.settings(method, task, seed, grid)])
        recorder = next(c for c in cli.trainer.callbacks if type(c).__name__ == "UpdateNorms")
        return recorder.records, cli.model


def main(argv: list[str] | None = None) -> dict:
    # allow_abbrev off: an option of reproduce.py (forwarded below) must not be taken for a prefix of one of ours.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--preset", default="long", choices=["long", "short"],
                        help="whose runs: reproduce.py --preset long (CoLA or STS-B) or --preset short (issue #25)")
    parser.add_argument("--task", default="cola", choices=sorted(reproduce.TASK_DIRS),
                        help="cola or stsb for the long preset; any GLUE task of the short one")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--methods", nargs="+", choices=reproduce.METHODS,
                        default=["adalora", "adalora_orthogonal_init", "svd_lora_init_r", "lora_scaled"])
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per method (then stop)")
    parser.add_argument("--every", type=int, default=50, help="record every this many steps")
    parser.add_argument("--backbone", default=None, help="as reproduce.py's (default: MiniLM)")
    parser.add_argument("--data-dir", default=None, help="as reproduce.py's (default: ../shared/data/glue)")
    parser.add_argument("--json", default=None,
                        help="default: benchmarks/results/<preset>/update_scale[-<tag>].json")
    args, grid_options = parser.parse_known_args(argv)
    if args.steps < 1 or args.every < 1:
        parser.error(f"--steps and --every must be positive (got {args.steps}, {args.every})")
    own = sorted(o for o in grid_options if o.split("=")[0] in ("--tasks", "--seeds", "--preset", "--report-only"))
    if own:
        parser.error(f"{own}: this script probes one run of each method (--task, --seed, --methods, --preset)")
    if args.preset == "long" and args.task not in reproduce.LONG_EPOCHS:
        parser.error(f"--preset long covers {sorted(reproduce.LONG_EPOCHS)}, not {args.task!r}")
    # The preset's settings for the run: the same overrides as the grid's runs (the committed ones for long).
    grid_argv = ["--preset", args.preset, "--tasks", args.task, "--seeds", str(args.seed), *grid_options]
    grid_argv += ["--backbone", args.backbone] if args.backbone else []
    grid_argv += ["--data-dir", args.data_dir] if args.data_dir else []
    grid = reproduce.parse_args(grid_argv)
    if args.json is None:
        args.json = str(reproduce.REPO / "benchmarks" / "results" / args.preset /
                        f"update_scale{reproduce.tag_suffix(grid)}.json")
    records = {m: probe(m, args.task, args.seed, args, grid)[0] for m in args.methods}

    steps = [r["step"] for r in records[args.methods[0]]]
    head = "| step | " + " | ".join(args.methods) + " |"
    rows = [head, "|" + "---:|" * (len(args.methods) + 1)]
    for i, step in enumerate(steps):
        cells = [f"{records[m][i]['relative_update']:.2e} ({records[m][i]['loss']:.3f})" if i < len(records[m])
                 else "-" for m in args.methods]
        rows.append(f"| {step} | " + " | ".join(cells) + " |")
    report = "\n".join(rows)
    print(f"\n{args.task}, seed {args.seed}: mean ||delta W|| / ||W|| over the adapted matrices (training loss)\n")
    print(report)
    # What defines the probed runs beyond task and seed (e.g. --lr-ratio-b), so a JSON says what it measured.
    payload = {"task": args.task, "seed": args.seed, "steps": args.steps, "every": args.every, "preset": args.preset,
               "grid_options": grid_options, "records": records, "table": report}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    print(f"\nwrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
