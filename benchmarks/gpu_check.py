"""The checks that need a GPU, in one script for a lent machine (``python benchmarks/gpu_check.py``).

1. ``pytest -m gpu tests/lightning/test_gpu.py``: the GLUE module with the callback on CUDA in 16-mixed and
   bf16-mixed, a resume and the three exports; the fused adapter kernel (``--model.kernel fused``) fitting to the
   budget in both precisions and matching the reference under bf16 autocast; a user's module with fused AdamW under
   fp16; FSDP1 refused at setup
   naming ModelParallelStrategy; the GLUE module sharded by ModelParallelStrategy (FSDP2, NCCL) on the GPUs there
   are; and ``tests/quant/test_quantized_gpu.py``: nf4, fp4, nf4 + double quantization and LLM.int8() bases on
   bitsandbytes' CUDA kernels (fit to the budget, base bit-identical), AdamW8bit's CUDA states, a merged nf4 model.
2. A 200-step fit with AdaLoRACallback on a DeBERTa-v3-base-shaped model (random weights: nothing can be
   downloaded there) in bf16-mixed and in 16-mixed: stopped at step 100, resumed from that checkpoint to 200,
   exported as a PEFT folder. Prints ms/step, the final total rank and whether the masked triplets are zero.
3. ``benchmarks/step_time.py --device cuda --models deberta,smollm2 --bf16`` (DeBERTa-v3-base's and SmolLM2-135M's
   shapes, random weights, bf16 autocast; 10 timed steps after 3 warm-up): the frozen floor, PEFT's AdaLoRA, ours
   with the reference and the fused adapter kernel (cubic phase; final phase masked, the fused one with the pattern
   frozen so only kept triplets are computed) and LoRA reference/fused; results in ``step_time_cuda.json`` beside
   ``gpu_check.json``, with each time ratio's median and quartiles over the rounds. And
   ``benchmarks/sharded_step.py --accelerator cuda``: FSDP2 (ModelParallelStrategy, NCCL) on the GPUs there are.

Results go to ``$OUT/gpu_check.json`` when ``OUT`` is set (the device tool's output folder), else to
``benchmarks/results/gpu_check.json``. ``--smoke`` runs part 2 on the CPU with a tiny model (checks the plumbing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adalora_pl import AdaLoRACallback, export_peft, find_adapters  # noqa: E402
from benchmarks.step_time import build_base  # noqa: E402

# Part 3: the step-time variants timed on the GPU (the fused adapter kernel against the reference and PEFT).
STEP_TIME_VARIANTS = ("frozen", "peft_adalora", "adalora", "adalora_fused", "adalora_masked", "adalora_masked_fused",
                      "lora", "lora_fused")


class RandomClassification(pl.LightningModule):
    """A transformers classifier on random tokens, AdamW; what the callback sees of a user's module."""

    def __init__(self, model_name: str, steps: int, batch_size: int, seq_len: int, vocab: int) -> None:
        super().__init__()
        self.net = build_base(model_name)
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (steps * batch_size, seq_len), generator=g)
        self.labels = torch.randint(0, 2, (steps * batch_size,), generator=g)
        self.batch_size = batch_size

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        return torch.nn.functional.cross_entropy(self.net(input_ids=ids).logits.float(), labels)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.ids, self.labels), batch_size=self.batch_size)


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t0)


def fit_resume_export(args, precision: str, work: Path) -> dict:
    """Fit to half the steps, resume from that checkpoint to the end, export; what a user's run does."""
    accelerator = "gpu" if torch.cuda.is_available() and not args.smoke else "cpu"
    total, half = args.steps, args.steps // 2
    settings = dict(init_r=12, target_r=8, tinit=int(0.1 * total), tfinal=int(0.2 * total), delta_t=5,
                    total_step=total)
    if args.smoke:
        settings.update(target_modules=["query", "key", "value"], init_r=4, target_r=2)

    def trainer(max_steps: int, timer: StepTimer, callback: AdaLoRACallback) -> pl.Trainer:
        return pl.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=max_steps,
                          logger=False, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=work, callbacks=[callback, timer], enable_checkpointing=False)

    def module() -> RandomClassification:
        return RandomClassification(args.model, total, args.batch_size, args.seq_len, vocab=100)

    first_timer, first_cb = StepTimer(), AdaLoRACallback(**settings)
    first = trainer(half, first_timer, first_cb)
    first.fit(module())
    ckpt = work / "half.ckpt"
    first.save_checkpoint(ckpt)

    timer, callback = StepTimer(), AdaLoRACallback(**settings)
    resumed_module = module()
    resumed = trainer(total, timer, callback)
    resumed.fit(resumed_module, ckpt_path=str(ckpt))
    adapters = find_adapters(resumed_module)
    export_peft(resumed_module.net, work / "peft", config=callback.config)  # the run's settings, as PEFT's schedule
    times = sorted(first_timer.times[2:] + timer.times[2:]) or [float("nan")]
    return {
        "precision": precision, "accelerator": accelerator, "steps": resumed.global_step,
        "ms_per_step_median": 1000 * times[len(times) // 2],
        "total_rank": sum(m.kept_rank for m in adapters.values()),
        "target_budget": callback.allocator.schedule.target_budget,
        "masked_triplets_zero": all(int(torch.count_nonzero(m.lora_E[~m.rank_mask])) == 0 for m in adapters.values()),
        "adapter_dtype": str(next(iter(adapters.values())).lora_A.dtype),
        "averages_device": str(callback.allocator.exp_avg_ipt.device),
        "peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20 if accelerator == "gpu" else None,
    }


def step_time_command(json_path: Path) -> list[str]:
    """Part 3's command line: ``benchmarks/step_time.py`` on CUDA, both models in bf16, results to ``json_path``."""
    return [sys.executable, "benchmarks/step_time.py", "--device", "cuda", "--models", "deberta,smollm2", "--bf16",
            "--variants", ",".join(STEP_TIME_VARIANTS), "--steps", "10", "--warmup", "3", "--quiet",
            "--json", str(json_path)]


def run(command: list[str], timeout: int) -> dict:
    """Run ``command`` in the repository; a timeout is reported (returncode None, the output so far), not raised, so
    that the other parts' results are still written."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        returncode, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as timed_out:
        returncode = None
        output = "".join(o.decode(errors="replace") if isinstance(o, bytes) else (o or "")
                         for o in (timed_out.stdout, timed_out.stderr)) + f"\n[timed out after {timeout}s]"
    tail = output[-4000:]
    print(tail)
    return {"command": " ".join(command), "returncode": returncode, "seconds": time.perf_counter() - start,
            "tail": tail}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--model", default="deberta", help="a model of benchmarks/step_time.py: deberta, minilm, tiny")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-step-time", action="store_true")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, 8 steps, fits only")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.seq_len, args.model = 8, 4, 16, "tiny"
        args.skip_tests = args.skip_step_time = True
    out_dir = Path(os.environ.get("OUT") or REPO / "benchmarks" / "results")
    work = out_dir / "gpu_check_work"
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"cuda": torch.cuda.is_available(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    if not args.skip_tests:
        tests = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/lightning/test_gpu.py",
                 "tests/quant/test_quantized_gpu.py"]
        report["gpu_tests"] = run(tests, 300)
    report["fits"] = []
    for precision in ("bf16-mixed", "16-mixed"):
        result = fit_resume_export(args, precision, work / precision)
        print(json.dumps(result))
        report["fits"].append(result)
    if not args.skip_step_time:
        step_json = out_dir / "step_time_cuda.json"
        report["step_time"] = run(step_time_command(step_json), 420)
        if report["step_time"]["returncode"] == 0:  # the ratios (medians, spread over rounds) of both models
            models = json.loads(step_json.read_text())["models"]
            report["step_time"]["ratios"] = {name: m["ratios"] for name, m in models.items()}
            report["step_time"]["ratio_spread"] = {name: m["ratio_spread"] for name, m in models.items()}
        # FSDP2 over the GPUs there are (NCCL): step time, memory and the bytes of every collective.
        report["sharded_step"] = run([sys.executable, "benchmarks/sharded_step.py", "--accelerator", "cuda",
                                      "--devices", str(max(1, torch.cuda.device_count())), "--steps", "20",
                                      "--json", str(out_dir / "sharded_step_cuda.json")], 300)
    print("\n| precision | steps | ms/step | total rank / budget | masked E zero | adapters | peak MiB |")
    print("|---|---:|---:|---|---|---|---:|")
    for r in report["fits"]:
        print(f"| {r['precision']} | {r['steps']} | {r['ms_per_step_median']:.1f} | {r['total_rank']} / "
              f"{r['target_budget']} | {r['masked_triplets_zero']} | {r['adapter_dtype']} | {r['peak_mem_mib']} |")
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
