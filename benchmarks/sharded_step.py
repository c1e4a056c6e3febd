"""AdaLoRA sharded by FSDP2 (Lightning's ModelParallelStrategy) against LoRA sharded and against AdaLoRA under DDP:
step time, per-rank peak memory, and the bytes each kind of collective moves per step and per mask event.

    python benchmarks/sharded_step.py --devices 2 --steps 30          # CPU processes (gloo), real MiniLM
    python benchmarks/sharded_step.py --devices 8 --accelerator cuda  # on a GPU machine (benchmarks/gpu_check.py)

Each variant runs in its own group of processes (``--variant`` runs one; the default runs all three and writes the
table). The collectives are counted by wrapping ``torch.distributed``'s functions in every rank: FSDP2's parameter
all-gathers and gradient reduce-scatters, and what AdaLoRA adds: the all-reduce of the Gram matrices of the orthogonal
regularizer (every step), of the per-triplet scores (at mask events) and of the inf/NaN flag, and the broadcast of the
keep-mask. The sums are over the run; the table divides them by steps and by mask events.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

VARIANTS = {  # name: (method, strategy)
    "adalora_fsdp2": ("adalora", "model_parallel"),
    "lora_fsdp2": ("lora", "model_parallel"),
    "adalora_ddp": ("adalora", "ddp"),
}
# FSDP2 (torch 2.13) gathers parameters with all_gather_single and reduces gradients with reduce_scatter_single;
# DDP's gradient all-reduce runs in its C++ reducer, out of Python's sight (it moves the trainable bytes per step).
COLLECTIVES = ("all_reduce", "broadcast", "all_gather_single", "reduce_scatter_single", "all_gather_into_tensor",
               "reduce_scatter_tensor", "all_gather")


def count_collectives(counts: dict) -> None:
    """Wrap torch.distributed's collectives to add each call's tensor bytes to ``counts[name]``."""
    import torch
    import torch.distributed as dist

    def wrap(name, fn):
        def counted(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            counts[name]["calls"] += 1
            counts[name]["bytes"] += tensors[0].numel() * tensors[0].element_size() if tensors else 0
            return fn(*args, **kwargs)
        return counted

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))


def run_variant(args: argparse.Namespace) -> None:
    """One variant, in the processes Lightning starts: writes ``<out>/<variant>-rank<N>.json``."""
    import lightning.pytorch as pl
    import torch
    from offline_models import minilm_folder
    from torch.utils.data import DataLoader

    from adalora_pl.tasks.glue_module import GLUEClassifier

    counts: dict = defaultdict(lambda: {"calls": 0, "bytes": 0})
    count_collectives(counts)
    torch.set_num_threads(args.threads)
    method, strategy_name = VARIANTS[args.variant]
    pl.seed_everything(0)
    module = GLUEClassifier(task_name="cola", backbone=str(minilm_folder()), method=method, init_r=12, target_r=8,
                            tinit=2, tfinal=4, delta_t=1, total_step=args.steps, learning_rate=5e-4)
    g = torch.Generator().manual_seed(3)
    rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": torch.tensor(1)}
            for i in torch.randint(1000, 20000, (args.steps * args.batch * args.devices, args.seq_len), generator=g)]

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.masks_at: dict[str, dict] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    if strategy_name == "model_parallel":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    else:
        strategy = "ddp"
    trainer = pl.Trainer(accelerator=args.accelerator, devices=args.devices, strategy=strategy, max_steps=args.steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer],
                         default_root_dir=args.out)
    loader = DataLoader(rows, batch_size=args.batch)
    trainer.fit(module, train_dataloaders=loader)
    cb = module.schedule_callback
    schedule = cb.allocator.schedule if cb is not None and cb.allocator is not None else None
    events = [s for s in range(args.steps) if schedule and (schedule.is_mask_step(s) or s == schedule.final_step)]
    mask_events = len(events)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes on Linux
    if torch.cuda.is_available() and args.accelerator == "cuda":
        peak = torch.cuda.max_memory_allocated()
    report = {"variant": args.variant, "rank": trainer.global_rank, "steps": args.steps, "mask_events": mask_events,
              "step_s_median": sorted(timer.times[2:])[len(timer.times[2:]) // 2], "peak_bytes": peak,
              "collectives": dict(counts)}
    Path(args.out, f"{args.variant}-rank{trainer.global_rank}.json").write_text(json.dumps(report))


def table(out: Path, devices: int) -> dict:
    results = {}
    for variant in VARIANTS:
        files = sorted(out.glob(f"{variant}-rank*.json"))
        if files:
            results[variant] = [json.loads(f.read_text()) for f in files]
    print(f"\n| variant ({devices} ranks) | step (median, rank 0) | peak memory per rank | "
          "all-gather MB/step | reduce-scatter MB/step | all-reduce KB/step | broadcast KB/step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant, ranks in results.items():
        r0 = ranks[0]

        def per_step(name, scale, r0=r0):
            return r0["collectives"].get(name, {}).get("bytes", 0) / r0["steps"] / scale

        gathered = per_step("all_gather_single", 2**20) + per_step("all_gather_into_tensor", 2**20)
        scattered = per_step("reduce_scatter_single", 2**20) + per_step("reduce_scatter_tensor", 2**20)
        print(f"| {variant} | {r0['step_s_median'] * 1000:.0f} ms | {max(r['peak_bytes'] for r in ranks) / 2**20:.0f}"
              f" MiB | {gathered:.2f} | {scattered:.2f} | {per_step('all_reduce', 2**10):.2f} | "
              f"{per_step('broadcast', 2**10):.2f} |")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=list(VARIANTS), default=None, help="run one (inside its processes)")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="rows per rank and step")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="/tmp/adalora_sharded_step")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.variant is not None:
        run_variant(args)
        return
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
        subprocess.run(command, check=True, cwd=out, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    results = table(out, args.devices)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
