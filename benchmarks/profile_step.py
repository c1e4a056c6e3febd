"""Where a training step's time goes: ``torch.profiler`` over step_time.py's variants, the matrix products split into
those with a rank-sized operand (the adapter branch's skinny products, the orthogonal regularizer's Gram matrices;
the classifier's few-label product counts there too, negligibly)
and the full-width ones, next to everything else (issue #24: what bounds the adapter step over the frozen floor).

    python benchmarks/profile_step.py --variants frozen,adalora_fused --threads 1 --steps 2

Times are self CPU times under the profiler (which adds its own cost to every small op), per step; compare the rows of
one run, not with step_time.py's timings.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time  # noqa: E402

MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_")


def profile_variant(name: str, base: torch.nn.Module, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per step by group: matrix products with a rank-sized operand (a dimension <= ``args.rank_max``), full
    matrix products, dropout's Bernoulli draws, and all other ops."""
    settings = step_time.parse_args(["--rank", str(args.rank), "--batch-size", str(args.batch_size),
                                     "--seq-len", str(args.seq_len)])
    variant = step_time.build_variant(name, base, settings, torch.device("cpu"))
    for _ in range(2):
        variant.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.steps):
            variant.step()
    groups: collections.Counter = collections.Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        seconds = event.self_cpu_time_total / 1e6 / args.steps
        if event.key in MATMULS:
            dims = [d for shape in event.input_shapes if shape for d in shape]
            skinny = any(d <= args.rank_max for d in dims)
            groups[f"{event.key} ({'rank-sized operand' if skinny else 'full width'})"] += seconds
        elif event.key == "aten::bmm":
            groups["aten::bmm (attention)"] += seconds
        elif event.key == "aten::bernoulli_":
            groups["aten::bernoulli_ (dropout)"] += seconds
        else:
            groups["other ops"] += seconds
    return dict(groups)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="a step_time.py model: minilm, deberta, smollm2, tiny")
    p.add_argument("--variants", default="frozen,adalora,adalora_fused")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rank-max", type=int, default=12, help="a product with a dimension <= this is rank-sized")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the groups of every variant here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = step_time.build_base(args.model)
    results = {}
    for name in args.variants.split(","):
        groups = profile_variant(name, base, args)
        results[name] = groups
        print(f"== {name}: {sum(groups.values()):.3f} s/step (self CPU time under the profiler)")
        for key, seconds in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"   {key:45s} {seconds:8.3f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": vars(args), "seconds_per_step": results}, indent=2))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
