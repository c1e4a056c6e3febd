"""Training-step time and peak memory of AdaLoRA and LoRA, ours and PEFT's, next to a frozen-backbone floor.

One process builds every variant of a model side by side and times them round-robin (each round runs one
step of every variant, in a rotated order), so load from other processes on a shared machine hits all
variants alike. A step is plain PyTorch, no Lightning:
forward + loss + backward + AdamW step + (rank allocator) + zero_grad.

Variants (same targets, same initial rank ``--rank`` everywhere: LoRA r = AdaLoRA init_r):

  frozen            all base weights frozen, classifier and pooler trained, input embeddings made to require
                    grad: backward runs through the whole network (the floor any adapter method pays).
  peft_lora         PEFT LoRA (``LoraConfig``, task_type SEQ_CLS, classifier and pooler in modules_to_save).
  peft_adalora      PEFT AdaLoRA: orthogonal regularizer added by its forward (task_type SEQ_CLS) and
                    ``model.base_model.update_and_allocate(step)`` after every optimizer step.
  lora              ours: ``inject_adapters(method="lora")``.
  adalora           ours: ``SVDLinear`` + ``orthogonal_regularizer`` (in the loss, or as a separate gradient the
                    way ``AdaLoRACallback`` adds it, ``add_orthogonal_regularizer_grad_``, ``--orth-mode grad``)
                    + ``RankAllocator.update_and_allocate``.
  adalora_final     ours, final phase: the pattern is frozen at the target budget (``--target-r`` per matrix on
                    average) and pruned triplets are physically dropped with ``adalora_pl.io.compact_adapters``
                    (the allocator is then no longer needed).
  adalora_masked    ours, final phase without compaction: the frozen pattern is re-applied after every step
                    (what ``AdaLoRACallback`` does, and what PEFT does).
  lora_fused        ours LoRA with the fused adapter kernel (``adalora_pl.layers.set_kernel(adapters, "fused")``:
                    base linear + dropout -> A -> B -> add in one autograd Function).
  adalora_fused     ours AdaLoRA with the fused kernel (E scale inside it); same allocator and orth reg as
                    ``adalora``.
  adalora_masked_fused
                    ``adalora_masked`` with the fused kernel and ``SVDLinear.freeze_pattern()`` on every layer
                    after the final mask event: the forward computes the kept triplets only (gathered), while the
                    allocator still re-applies the pattern after every step.
  lora_unfused,     optional (``--variants``): ours with ``fuse_residual_add = False`` on every adapter layer, i.e.
  adalora_unfused   the reference's unfused ``result + update * scaling [/ denom]``; what the one-pass add buys.

The floor saves less for backward than any adapter method (a frozen linear layer needs no copy of its input), so
its peak memory is a floor too. Models: ``minilm`` (the real all-MiniLM-L6-v2), ``deberta`` (DeBERTa-v3-base's
shape, random weights), ``smollm2`` (a ``LlamaForSequenceClassification`` of SmolLM2-135M's shape: 30 layers x 576,
9 heads, 3 kv heads, random weights; its head is ``score``), ``tiny`` (a 2-layer BERT from a config, for
``--smoke``). ``deberta`` and ``smollm2`` run under bf16 autocast on CUDA (``--bf16`` for the others).

Both AdaLoRA variants (and ``adalora`` vs ``peft_adalora``) run the same schedule: tinit 0, delta_t 10, total
steps 1000, tfinal 200, so every timed step lies in the cubic phase and one in ``delta_t`` is a mask event.

Time: the median of the per-step times of each variant, wall clock by default (``--clock cpu``: the process's
CPU time, steadier when other processes share the cores; use it with ``--threads 1``, since with several threads
it also counts OpenMP spin-waits). Ratios are medians of per-round ratios (the two variants of a ratio ran in
the same round), which cancels slow drifts of the machine load. Both clocks are in the JSON. The spread of each
time ratio over the rounds is reported with it: the JSON's ``ratio_spread`` gives median, quartiles (of the
per-round ratios, ``statistics.quantiles(n=4, method="inclusive")``, so within [min, max]; None with one round),
min, max and the number of rounds; the table prints ``median [q1, q3]``. ``ratios`` keeps the medians alone.

Peak memory:
  CUDA: ``torch.cuda.max_memory_allocated()`` over ``--memory-steps`` steps minus the memory allocated before them
        (model, adapters); measured in this process, variant after variant, after the timing.
  CPU:  torch keeps no statistics of its CPU allocator, and tracemalloc does not see torch's allocations, so
        the measure is the resident set of this process. After the timing, glibc's mmap threshold is pinned at
        64 KiB (``mallopt``; otherwise glibc raises it after the first large free and keeps freed tensors in
        a heap it seldom returns), so every tensor above 64 KiB is its own mapping, unmapped when freed, and
        the resident set follows the live tensors. For each variant, in turn: ``malloc_trim``, reset the
        kernel's peak-RSS counter (``/proc/self/clear_refs``), run ``--memory-steps`` steps, read the peak
        (``VmHWM``) and subtract the resident set just before the steps. (Without the reset, e.g. off Linux,
        ``ru_maxrss`` is used, which is only right for the first variant.) So the number is what a training
        step adds on top of the model and its optimizer state: activations, gradients, temporaries.

    python benchmarks/step_time.py --models minilm --batch-size 32 --seq-len 128 --steps 20 --warmup 2 \\
        --json /tmp/step_time.json
    # on a machine shared with other jobs: one thread, CPU time
    python benchmarks/step_time.py --models minilm,deberta --threads 1 --clock cpu --steps 4 --warmup 1
    python benchmarks/step_time.py --smoke --json /tmp/step_time.json     # tiny BERT, seconds
    # on a GPU (bf16): the fused kernel against the reference and PEFT
    python benchmarks/step_time.py --device cuda --models deberta,smollm2 --steps 10 --warmup 3 \
        --variants frozen,peft_adalora,adalora,adalora_fused,adalora_masked,adalora_masked_fused,lora,lora_fused
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import gc
import json
import math
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# The package, and offline_models beside this file (on the path when run as a script, not when imported).
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from offline_models import minilm_folder  # noqa: E402

from adalora_pl import RankAllocator, inject_adapters, orthogonal_regularizer  # noqa: E402
from adalora_pl.importance import add_orthogonal_regularizer_grad_  # noqa: E402
from adalora_pl.injection import preset_targets  # noqa: E402
from adalora_pl.io import compact_adapters  # noqa: E402
from adalora_pl.layers import set_kernel  # noqa: E402

DEFAULT_VARIANTS = ("frozen", "peft_lora", "peft_adalora", "lora", "adalora", "adalora_final", "adalora_masked",
                    "lora_fused", "adalora_fused", "adalora_masked_fused")
# Optional: ours with the unfused residual add (fuse_residual_add = False on the adapter layers), i.e. the arithmetic
# path before the fused one-pass add; to measure what the fusion buys.
ALL_VARIANTS = DEFAULT_VARIANTS + ("lora_unfused", "adalora_unfused")
HEADS = ["classifier", "pooler", "score"]  # trained in full; "score" is the head of LlamaForSequenceClassification
# Models that run under bf16 autocast on CUDA without --bf16.
BF16_ON_CUDA = ("deberta", "smollm2")
# Schedule of every AdaLoRA variant: all timed steps in the cubic phase, a mask event every DELTA_T steps.
TOTAL_STEP, TINIT, TFINAL, DELTA_T = 1000, 0, 200, 10
LR = 1e-4
MMAP_THRESHOLD = 64 * 1024  # bytes; see pin_glibc_malloc


# ====================================================================== models
def build_base(name: str, seed: int = 0, num_layers: int | None = None) -> torch.nn.Module:
    """The backbone with a 2-label classification head; train mode (dropout on, as in fine-tuning).

    ``num_layers`` overrides the number of transformer layers of a model built from a config (``deberta``,
    ``smollm2``, ``tiny``): a shallower model of the same width, for tests.
    """
    torch.manual_seed(seed)
    depth = {"deberta": 12, "smollm2": 30, "tiny": 2}.get(name) if num_layers is None else num_layers
    if name == "minilm":
        if num_layers is not None:
            raise ValueError("num_layers: minilm is the real checkpoint; only config-built models take it")
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(str(minilm_folder()), num_labels=2)
    elif name == "deberta":
        from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

        # microsoft/deberta-v3-base's shape, random weights.
        config = DebertaV2Config(
            vocab_size=128100, hidden_size=768, num_hidden_layers=depth, num_attention_heads=12,
            intermediate_size=3072, max_position_embeddings=512, type_vocab_size=0, relative_attention=True,
            position_buckets=256, max_relative_positions=-1, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
            share_att_key=True, position_biased_input=False, num_labels=2,
        )
        model = DebertaV2ForSequenceClassification(config)
    elif name == "smollm2":
        from transformers import LlamaForSequenceClassification

        model = LlamaForSequenceClassification(smollm2_config(depth))
    elif name == "tiny":
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=depth, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64, num_labels=2)
        model = BertForSequenceClassification(config)
    else:
        raise ValueError(f"unknown model {name!r}: minilm, deberta, smollm2 or tiny")
    model.train()
    return model


def smollm2_config(num_layers: int | None = None):
    """HuggingFaceTB/SmolLM2-135M's shape (that of the converted SmolLM2-135M-Instruct folder benchmarks/llm_xsum.py
    uses) with a 2-label head; ``num_layers`` overrides its 30 layers.

    For random weights: nothing is downloaded, so it builds offline. ``pad_token_id`` lets the head pick each row's
    last non-pad token (random ids may contain it; the cost is the same).
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30 if num_layers is None else num_layers, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, hidden_act="silu", max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, use_cache=False, num_labels=2,
    )


def make_batch(model: torch.nn.Module, batch_size: int, seq_len: int, device: torch.device, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return {
        "input_ids": torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(device),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long, device=device),
        "labels": torch.randint(0, 2, (batch_size,), generator=g).to(device),
    }


def share_frozen_copy(base: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``base`` whose backbone parameters are the same tensors (only the heads are copied).

    Every variant freezes the backbone, so sharing it changes nothing but memory: one DeBERTa, not seven.
    """
    shared = {
        id(p): p for n, p in base.named_parameters()
        if not any(part in HEADS for part in n.split("."))
    }
    return copy.deepcopy(base, memo=shared)


# ====================================================================== variants
class Variant:
    """One model + optimizer + step function; ``step()`` runs one full training step."""

    def __init__(self, name: str, model: torch.nn.Module, batch: dict, autocast: torch.dtype | None,
                 note: str = "") -> None:
        self.name, self.model, self.batch, self.autocast, self.note = name, model, batch, autocast, note
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        # None when nothing is trained (a causal LM's frozen floor: its head is the tied embedding matrix).
        self.optimizer = torch.optim.AdamW(params, lr=LR) if params else None
        self.step_index = 1  # step 0 is tinit: start in the cubic phase
        self.after_step = None  # callable(step) run after optimizer.step(), before zero_grad
        self.extra_loss = None  # callable() -> regularizer term added to the loss
        self.extra_grad = None  # callable() -> adds a regularizer gradient into .grad (callback style)

    def forward_loss(self) -> torch.Tensor:
        device_type = next(self.model.parameters()).device.type
        with torch.autocast(device_type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            loss = self.model(**self.batch).loss
            if self.extra_loss is not None:
                loss = loss + self.extra_loss()
        return loss

    def step(self) -> None:
        loss = self.forward_loss()
        loss.backward()
        if self.extra_grad is not None:
            self.extra_grad()
        if self.optimizer is not None:
            self.optimizer.step()
        if self.after_step is not None:
            self.after_step(self.step_index)
        if self.optimizer is not None:
            self.optimizer.zero_grad()
        self.step_index += 1


def _ours_adalora(base, args, batch, autocast) -> tuple[torch.nn.Module, dict, RankAllocator, list]:
    model = share_frozen_copy(base)
    adapters = inject_adapters(model, preset_targets(model), method="adalora", r=args.rank, lora_alpha=args.alpha,
                               trainable_modules=HEADS)
    allocator = RankAllocator(adapters, target_r=args.target_r, tinit=TINIT, tfinal=TFINAL, total_step=TOTAL_STEP,
                              delta_t=DELTA_T)
    factors = [(m.lora_A, m.lora_B) for m in adapters.values()]
    return model, adapters, allocator, factors


def _add_orth_reg(variant: Variant, factors_fn, weight: float, mode: str) -> None:
    if weight == 0:
        return
    if mode == "loss":
        variant.extra_loss = lambda: weight * orthogonal_regularizer(factors_fn())
        return

    # What AdaLoRACallback.on_before_optimizer_step does, through the same library function.
    variant.extra_grad = lambda: add_orthogonal_regularizer_grad_(factors_fn(), weight)


def set_residual_fusion(adapters: Iterable[torch.nn.Module], fused: bool) -> None:
    """The layers' residual add in one pass (the default), or as the reference's plain expressions (``fused=False``:
    the ``*_unfused`` variants); a switch of each layer, so the variants of one process do not share it."""
    for layer in adapters:
        layer.fuse_residual_add = fused


def build_variant(name: str, base: torch.nn.Module, args, device: torch.device) -> Variant:
    autocast = torch.bfloat16 if args.bf16 else None
    batch = make_batch(base, args.batch_size, args.seq_len, device)
    targets = preset_targets(base)
    if name == "frozen":
        model = share_frozen_copy(base)
        model.requires_grad_(False)
        for n, m in model.named_modules():
            if n.split(".")[-1] in HEADS:
                m.requires_grad_(True)
        model.enable_input_require_grads()
        return Variant(name, model, batch, autocast)
    if name in ("peft_lora", "peft_adalora"):
        from peft import AdaLoraConfig, LoraConfig, get_peft_model

        common = dict(target_modules=targets, modules_to_save=HEADS, lora_alpha=args.alpha, lora_dropout=0.0,
                      task_type="SEQ_CLS")
        if name == "peft_lora":
            config = LoraConfig(r=args.rank, **common)
        else:
            config = AdaLoraConfig(init_r=args.rank, target_r=args.target_r, tinit=TINIT, tfinal=TFINAL,
                                   deltaT=DELTA_T, total_step=TOTAL_STEP, orth_reg_weight=args.orth_reg_weight,
                                   **common)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(share_frozen_copy(base), config)
        variant = Variant(name, model, batch, autocast)
        if name == "peft_adalora":
            variant.after_step = model.base_model.update_and_allocate
        return variant
    if name in ("lora", "lora_unfused", "lora_fused"):
        model = share_frozen_copy(base)
        adapters = inject_adapters(model, targets, method="lora", r=args.rank, lora_alpha=args.alpha,
                                   trainable_modules=HEADS)
        set_residual_fusion(adapters.values(), fused=name != "lora_unfused")
        if name == "lora_fused":
            set_kernel(adapters.values(), "fused")
        return Variant(name, model, batch, autocast, note="kernel fused" if name == "lora_fused" else "")
    if name in ("adalora", "adalora_unfused", "adalora_fused"):
        model, adapters, allocator, factors = _ours_adalora(base, args, batch, autocast)
        set_residual_fusion(adapters.values(), fused=name != "adalora_unfused")
        note = f"orth reg in the {args.orth_mode}"
        if name == "adalora_fused":
            set_kernel(adapters.values(), "fused")
            note += ", kernel fused"
        variant = Variant(name, model, batch, autocast, note=note)
        _add_orth_reg(variant, lambda: factors, args.orth_reg_weight, args.orth_mode)
        variant.after_step = allocator.update_and_allocate
        return variant
    if name in ("adalora_final", "adalora_masked", "adalora_masked_fused"):
        model, adapters, allocator, factors = _ours_adalora(base, args, batch, autocast)
        if name == "adalora_masked_fused":
            set_kernel(adapters.values(), "fused")
        variant = Variant(name, model, batch, autocast)
        _add_orth_reg(variant, lambda: factors, args.orth_reg_weight, args.orth_mode)
        variant.after_step = allocator.update_and_allocate
        # Some cubic-phase steps to fill the importance averages, then the final mask event.
        for _ in range(max(2, args.warmup)):
            variant.step()
        allocator.update_and_allocate(allocator.schedule.final_step)
        assert allocator.frozen
        variant.step_index = allocator.schedule.final_step + 1
        if name == "adalora_masked":
            variant.note = "masked (frozen pattern re-applied each step)"
            return variant
        if name == "adalora_masked_fused":
            # The pattern is final: the fused kernel computes the kept triplets only. The allocator is left as
            # it is (it still re-applies the pattern after every step, as for adalora_masked).
            for layer in adapters.values():
                layer.freeze_pattern()
            kept = sum(layer.kept_rank for layer in adapters.values())
            variant.note = f"masked, kernel fused, pattern frozen ({kept} kept triplets gathered)"
            return variant
        ranks = compact_adapters(model, variant.optimizer)
        factors = [(m.lora_A, m.lora_B) for m in adapters.values() if m.r > 0]
        variant.after_step = None  # nothing left to mask: the pruned triplets are gone
        variant.note = f"compacted to {sum(ranks.values())} triplets"
        variant.trainable = sum(p.numel() for g in variant.optimizer.param_groups for p in g["params"])
        return variant
    raise ValueError(f"unknown variant {name!r}")


# ====================================================================== measurement
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(variants: list[Variant], steps: int, warmup: int, device: torch.device,
                  progress: bool = False) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-step wall times and process CPU times of every variant, round-robin (see the module docstring).

    Python's cyclic garbage collector is run between rounds, not whenever it likes inside a timed step.
    """
    for v in variants:
        for _ in range(warmup):
            v.step()
    _sync(device)
    wall: dict[str, list[float]] = {v.name: [] for v in variants}
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        _timed_rounds(variants, steps, device, wall, cpu, progress)
    finally:
        if gc_was_enabled:
            gc.enable()
    return wall, cpu


def _timed_rounds(variants: list[Variant], steps: int, device: torch.device, wall: dict, cpu: dict,
                  progress: bool) -> None:
    for round_index in range(steps):
        gc.collect()
        shift = round_index % len(variants)
        for v in variants[shift:] + variants[:shift]:
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            v.step()
            _sync(device)
            wall[v.name].append(time.perf_counter() - start)
            cpu[v.name].append(time.process_time() - start_cpu)
        if progress:
            print(f"   round {round_index + 1}/{steps}: "
                  + ", ".join(f"{v.name} {wall[v.name][-1] * 1e3:.0f}ms" for v in variants), flush=True)


def _proc_status(key: str) -> int | None:
    """A ``kB`` field of /proc/self/status, in bytes (``None`` off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def pin_glibc_malloc() -> bool:
    """Make freed large blocks go back to the system, so that the resident set follows live tensors.

    glibc raises its mmap threshold after the first free of a large block and then serves large blocks
    from a heap it seldom trims; pinning the threshold (and the trim threshold) turns that off.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD) == 1 and libc.mallopt(m_trim_threshold, MMAP_THRESHOLD) == 1
    _trim()
    return ok


def _trim() -> None:
    """Collect Python garbage, then hand glibc's free heap memory back to the system."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def cpu_peak_delta(variant: Variant, steps: int) -> tuple[int, str]:
    """Peak RSS over ``steps`` steps minus the RSS just before them (see the module docstring)."""
    _trim()
    method = "VmHWM after clear_refs"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        method = "ru_maxrss"
    before = _proc_status("VmRSS") or 0
    for _ in range(steps):
        variant.step()
    if method == "ru_maxrss":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    else:
        peak = _proc_status("VmHWM") or 0
    return peak - before, method


def cuda_peak_delta(variant: Variant, steps: int, device: torch.device) -> tuple[int, str]:
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    for _ in range(steps):
        variant.step()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated"


# ====================================================================== report
# The reported ratios, in order: (key, "time" or "mem", numerator variant, denominator variant). A time ratio is the
# median of per-round ratios (with its spread over the rounds), a memory ratio the ratio of the two peaks.
RATIOS = (
    ("adalora_vs_peft_adalora", "time", "adalora", "peft_adalora"),
    ("adalora_vs_lora", "time", "adalora", "lora"),
    ("peak_mem_vs_peft_adalora", "mem", "adalora", "peft_adalora"),
    ("lora_vs_peft_lora", "time", "lora", "peft_lora"),
    ("adalora_final_vs_lora", "time", "adalora_final", "lora"),
    ("adalora_masked_vs_lora", "time", "adalora_masked", "lora"),
    ("adalora_vs_adalora_unfused", "time", "adalora", "adalora_unfused"),
    ("lora_vs_lora_unfused", "time", "lora", "lora_unfused"),
    ("adalora_unfused_vs_peft_adalora", "time", "adalora_unfused", "peft_adalora"),
    ("peft_adalora_vs_peft_lora", "time", "peft_adalora", "peft_lora"),
    ("peak_mem_vs_lora", "mem", "adalora", "lora"),
    # The fused kernel (#24): each adapter method over the frozen floor, and fused against reference and PEFT.
    ("adalora_vs_frozen", "time", "adalora", "frozen"),
    ("adalora_fused_vs_frozen", "time", "adalora_fused", "frozen"),
    ("adalora_masked_vs_frozen", "time", "adalora_masked", "frozen"),
    ("adalora_masked_fused_vs_frozen", "time", "adalora_masked_fused", "frozen"),
    ("lora_fused_vs_frozen", "time", "lora_fused", "frozen"),
    ("adalora_fused_vs_peft_adalora", "time", "adalora_fused", "peft_adalora"),
    ("adalora_fused_vs_adalora", "time", "adalora_fused", "adalora"),
    ("peak_mem_adalora_fused_vs_peft_adalora", "mem", "adalora_fused", "peft_adalora"),
)


def round_ratios(times: dict[str, list[float]], num: str, den: str) -> list[float] | None:
    """The per-round ratios ``num / den`` (None when either variant did not run)."""
    if num not in times or den not in times:
        return None
    return [a / b for a, b in zip(times[num], times[den], strict=True)]


def ratio_of_rounds(times: dict[str, list[float]], num: str, den: str) -> float | None:
    """The median of the per-round ratios ``num / den``."""
    ratios = round_ratios(times, num, den)
    return statistics.median(ratios) if ratios else None


def ratio_spread_of_rounds(times: dict[str, list[float]], num: str, den: str) -> dict | None:
    """The per-round ratios ``num / den`` summarized: median (what :func:`ratio_of_rounds` gives), quartiles
    (``statistics.quantiles(n=4, method="inclusive")``: within [min, max]; None with a single round), min, max and
    the number of rounds."""
    ratios = round_ratios(times, num, den)
    if not ratios:
        return None
    q1 = q3 = None
    if len(ratios) >= 2:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3, "min": min(ratios), "max": max(ratios),
            "rounds": len(ratios)}


def compute_ratios(times: dict[str, list[float]],
                   memory: dict[str, tuple[int, str]]) -> tuple[dict[str, float | None], dict[str, dict | None]]:
    """The flat ratios (time ratios as medians of per-round ratios, memory ratios of peaks), every key of
    :data:`RATIOS`, and the spread over rounds of the time ratios (``ratio_spread``)."""
    ratios: dict[str, float | None] = {}
    spread: dict[str, dict | None] = {}
    for key, kind, num, den in RATIOS:
        if kind == "mem":
            ratios[key] = (memory[num][0] / memory[den][0]
                           if num in memory and den in memory and memory[den][0] > 0 else None)
            continue
        spread[key] = ratio_spread_of_rounds(times, num, den)
        ratios[key] = spread[key]["median"] if spread[key] is not None else None
    return ratios, spread


def run_model(model_name: str, args, device: torch.device) -> dict:
    print(f"\n== {model_name}: batch {args.batch_size} x length {args.seq_len}, rank {args.rank} "
          f"(AdaLoRA target_r {args.target_r}), {args.steps} timed steps per variant after {args.warmup} warm-up, "
          f"device {device}, {torch.get_num_threads()} threads", flush=True)
    base = build_base(model_name).to(device)
    built = time.perf_counter()
    variants = [build_variant(v, base, args, device) for v in args.variants]
    print(f"   built {len(variants)} variants in {time.perf_counter() - built:.1f}s", flush=True)
    wall, cpu = time_variants(variants, args.steps, args.warmup, device, progress=not args.quiet)
    times = cpu if args.clock == "cpu" else wall

    memory: dict[str, tuple[int, str]] = {}
    if not args.no_memory:
        if device.type == "cpu" and not pin_glibc_malloc():
            print("   warning: could not pin glibc's mmap threshold; CPU peak memory is approximate")
        for v in variants:
            if device.type == "cuda":
                memory[v.name] = cuda_peak_delta(v, args.memory_steps, device)
            else:
                memory[v.name] = cpu_peak_delta(v, args.memory_steps)

    results = {}
    floor = statistics.median(times["frozen"]) if "frozen" in times else None
    for v in variants:
        t = times[v.name]
        med = statistics.median(t)
        results[v.name] = {
            "median_s": med,
            "mean_s": statistics.fmean(t),
            "min_s": min(t),
            "times_s": t,
            "wall_times_s": wall[v.name],
            "cpu_times_s": cpu[v.name],
            "vs_frozen": med / floor if floor else None,
            "peak_mem_bytes": memory[v.name][0] if v.name in memory else None,
            "peak_mem_method": memory[v.name][1] if v.name in memory else None,
            "trainable_params": v.trainable,
            "note": v.note,
        }
    ratios, spread = compute_ratios(times, memory)
    print_table(model_name, results, ratios, args, spread)
    return {"variants": results, "ratios": ratios, "ratio_spread": spread}


def print_table(model_name: str, results: dict, ratios: dict, args, spread: dict | None = None) -> None:
    print(f"\n({args.clock} time per step)")
    print(f"{'variant':<22}{'median ms':>11}{'mean ms':>10}{'x frozen':>10}{'peak MiB':>10}{'trainable':>11}  note")
    for name, r in results.items():
        mem = f"{r['peak_mem_bytes'] / 2**20:.0f}" if r["peak_mem_bytes"] is not None else "-"
        vs = f"{r['vs_frozen']:.3f}" if r["vs_frozen"] else "-"
        print(f"{name:<22}{r['median_s'] * 1e3:>11.1f}{r['mean_s'] * 1e3:>10.1f}{vs:>10}{mem:>10}"
              f"{r['trainable_params']:>11,}  {r['note']}")
    print(f"\nratios ({model_name}; time ratios: median [q1, q3] of per-round ratios of {args.clock} time; "
          "peak_mem: ratio of peaks):")
    spread = spread or {}
    for key, value in ratios.items():
        if value is None:
            continue
        s = spread.get(key)
        quartiles = f" [{s['q1']:.3f}, {s['q3']:.3f}]" if s is not None and s["q1"] is not None else ""
        print(f"  {key:<40}{value:.3f}{quartiles}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="minilm", help="comma-separated: minilm, deberta, smollm2, tiny")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, from {ALL_VARIANTS}")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (= rounds)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--rank", type=int, default=8, help="LoRA r and AdaLoRA init_r")
    p.add_argument("--target-r", type=int, default=4, help="AdaLoRA target_r (final phase: average kept rank)")
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--orth-reg-weight", type=float, default=0.1)
    p.add_argument("--orth-mode", choices=["loss", "grad"], default="loss",
                   help="ours: regularizer in the loss, or its gradient added before the optimizer step "
                        "(AdaLoRACallback's way)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time measure for medians and ratios: wall clock, or the process's CPU time (steadier on a "
                        "shared machine with --threads 1; with several threads it counts OpenMP spin-waits too)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true",
                   help=f"bf16 autocast (default on for {', '.join(BF16_ON_CUDA)} on CUDA)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", help="write the results here (default: benchmarks/results/step_time[_smoke].json)")
    p.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    p.add_argument("--smoke", action="store_true", help="tiny BERT, batch 8 x 32, 3 steps: checks the plumbing")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.batch_size, args.seq_len = "tiny", 8, 32
        args.steps, args.warmup, args.memory_steps = 3, 1, 1
    if args.json is None:
        args.json = str(REPO / "benchmarks" / "results" / ("step_time_smoke.json" if args.smoke else "step_time.json"))
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - set(ALL_VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {ALL_VARIANTS}")
    if not 0 < args.target_r <= args.rank:
        p.error("--target-r must be in (0, --rank]")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = {
        "config": {
            "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
            "rank": args.rank, "target_r": args.target_r, "alpha": args.alpha,
            "orth_reg_weight": args.orth_reg_weight, "orth_mode": args.orth_mode, "device": str(device),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "clock": args.clock,
            "schedule": {"total_step": TOTAL_STEP, "tinit": TINIT, "tfinal": TFINAL, "delta_t": DELTA_T},
            "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        },
        "models": {},
    }
    bf16_flag = args.bf16
    for model_name in args.models:
        args.bf16 = bf16_flag or (device.type == "cuda" and model_name in BF16_ON_CUDA)
        out["models"][model_name] = run_model(model_name, args, device)
        out["models"][model_name]["bf16"] = args.bf16
    # The headline ratios: those of the first model (medians; their spread over rounds beside them).
    out["ratios"] = out["models"][args.models[0]]["ratios"]
    out["ratio_spread"] = out["models"][args.models[0]]["ratio_spread"]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
        print(f"\nwrote {args.json}")
    return out


if __name__ == "__main__":
    main()
