"""AdaLoRA adapters rewritten as a standard PEFT LoRA adapter: :func:`export_lora` (docs/method.md §10).

A LoRA adapter is what most serving stacks load (vLLM, TGI, ``merge_and_unload`` scripts), and it needs no
``ranknum`` or singular values: each AdaLoRA layer's kept triplets fold exactly into LoRA's two factors. As read
from peft 0.21 (``save_pretrained`` of a ``LoraConfig`` model) and checked by the tests:

- ``adapter_model.safetensors`` keys: ``base_model.model.<module path>.lora_A.weight`` (r, in) and
  ``.lora_B.weight`` (out, r): the ``nn.Linear`` weights of PEFT's two factor layers, without the adapter name.
  A GPT-2 ``Conv1D`` (``fan_in_fan_out``) gets factors of the same shapes; only its base weight is (in, out).
- ``r`` / ``lora_alpha`` in ``adapter_config.json`` are the defaults; ``rank_pattern`` / ``alpha_pattern`` override
  them per module. PEFT looks a module up in them with ``re.match(rf"(.*\\.)?({key})$", name)``, taking the first
  key that matches: a key is a regex, and it matches any module whose name ends with ``"." + key``.
- The scaling of a layer is ``alpha / r`` (``use_rslora`` False), so ``alpha == r`` makes it exactly 1.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from adalora_pl.injection import find_adapters
from adalora_pl.io._common import cpu_copy, dropout_p
from adalora_pl.io.peft import (
    PEFT_PREFIX,
    infer_peft_task_type,
    peft_modules_to_save,
    peft_target_modules,
    write_peft_folder,
)
from adalora_pl.io.surgery import check_pruned_triplets
from adalora_pl.layers import INITIAL_TENSORS, SVDLinear

log = logging.getLogger(__name__)


@torch.no_grad()
def lora_factors(adapter: SVDLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors ``(lora_A (k, in), lora_B (out, k))`` of an AdaLoRA layer with ``k`` kept triplets, such that
    ``lora_B @ lora_A`` is its update ``B diag(E) A * lora_alpha / (ranknum + 1e-5)`` with scaling 1.

    ``lora_A = (E * s)[keep] * A[keep]`` and ``lora_B = B[:, keep]``, ``s = lora_alpha / (ranknum + 1e-5)``
    (``lora_alpha / sqrt(ranknum + 1e-5)`` under rsLoRA scaling). Pruned triplets are left out, which is exact only
    when their ``lora_E`` is zero (see :func:`~adalora_pl.io.surgery.check_pruned_triplets`). A weight-SVD layer
    adds its initial triplets with a negated scale, so that the update is relative to the pretrained weight (its
    rank is then :func:`lora_rank`). Both factors keep the adapter's dtype.
    """
    keep = adapter.rank_mask.nonzero().view(-1).to(adapter.lora_A.device)
    # E and the scaling go into A: B stays the left singular vectors, and A * E is the product the forward pass
    # forms anyway. Computed in float64 and rounded once, so the fold itself adds no error beyond the dtype's.
    scale = adapter.scale().to(adapter.lora_A.device)  # lora_alpha / (ranknum + 1e-5), or the rsLoRA scale
    lora_a = (adapter.lora_A.double() * (adapter.lora_E.double() * scale))[keep]
    lora_b = adapter.lora_B[:, keep]
    if adapter.adapter_init == "weight_svd":
        # PEFT's PiSSA conversion: the folder's update is relative to the pretrained W, which is our residual base
        # plus the initial triplets' update; so they are appended with a negative sign (docs/method.md §13).
        a0, e0, b0 = (getattr(adapter, name) for name in INITIAL_TENSORS)
        lora_a = torch.cat([lora_a, -(a0.double() * (e0.double() * scale))])
        lora_b = torch.cat([lora_b, b0], dim=1)
    return lora_a.to(adapter.lora_A.dtype), lora_b


def lora_rank(adapter: SVDLinear) -> int:
    """The rank of the LoRA layer :func:`lora_factors` makes of ``adapter``: its kept triplets, plus its initial
    ones for a weight-SVD start."""
    initial = adapter.init_lora_E.shape[0] if adapter.adapter_init == "weight_svd" else 0
    return adapter.kept_rank + initial


def _pattern_matches(key: str, name: str) -> bool:
    # PEFT's lookup of a module in rank_pattern / alpha_pattern (peft.utils.other.get_pattern_key).
    try:
        return re.match(rf"(.*\.)?({key})$", name) is not None
    except re.error:
        return True  # not a valid regex: count it as ambiguous, so that the escaped key is used instead


def pattern_keys(paths: Iterable[str], targeted: Iterable[str]) -> dict[str, str]:
    """The ``rank_pattern`` / ``alpha_pattern`` key of each module path, for a model whose adapted modules are
    ``targeted``.

    The plain path, unless (with PEFT's regex lookup) a key would also match another targeted module, e.g. a
    path that is a suffix of another module's name: PEFT would then use whichever key comes first. Then every
    key becomes ``^`` + the escaped path, which PEFT's pattern ``(.*\\.)?(key)$`` can only match from the start
    of the name, i.e. the module itself.
    """
    paths, targeted = list(paths), list(targeted)
    if any(_pattern_matches(p, n) for p in paths for n in targeted if n != p):
        return {p: "^" + re.escape(p) for p in paths}
    return {p: p for p in paths}


def export_lora(
    model: nn.Module,
    directory: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    head_modules: Iterable[str] | None = None,
    zero_masked: bool = False,
) -> Path:
    """Write ``model``'s AdaLoRA adapters as a standard PEFT **LoRA** adapter folder (``adapter_config.json`` with
    ``peft_type: "LORA"`` + ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base, directory)``
    and other LoRA consumers load.

    Each layer with ``k`` kept triplets (``rank_mask`` True) becomes a rank-``k`` LoRA layer:
    ``lora_A = (E * s)[keep] * A[keep]`` (k, in) and ``lora_B = B[:, keep]`` (out, k), with
    ``s = lora_alpha / (ranknum + 1e-5)`` (see :func:`lora_factors`), and scaling ``alpha / r = k / k = 1``.
    The config's ``r`` and ``lora_alpha`` are the most common ``k``; ``rank_pattern`` and ``alpha_pattern`` map the
    other layers to their ``k`` (keys: module paths, anchored when a plain path would also match another
    module). Layers pruned to ``k = 0`` carry no update and are left out of ``target_modules`` (LoRA has no rank 0),
    which the log lists. Trained heads are written as ``modules_to_save``, as in :func:`export_peft`.

    The loaded model's outputs equal ``model``'s up to float rounding (the fold is rounded once into ``lora_A``).
    On a quantized base (bitsandbytes 4-bit / int8, torchao int8) the folder is the same as on its unquantized model,
    and PEFT loads it onto the base quantized the same way (its LoRA ``Linear4bit``, ``Linear8bitLt`` or torchao
    layer; docs/method.md §11).
    Unlike :func:`export_peft`, layers may differ in ``ranknum``, ``lora_alpha`` and scaling rule: the fold absorbs
    them. What is lost is the AdaLoRA structure (E, the orthogonality of A and B, the pruned triplets): the folder is
    for inference or further plain LoRA training. A weight-SVD layer (docs/method.md §13) becomes a LoRA of rank
    kept + init_r whose update is relative to the pretrained weight (PEFT's PiSSA conversion), so the folder loads
    onto the original base model.

    Args:
        model: a model with :class:`SVDLinear` adapters.
        directory: output folder (created).
        base_model_name_or_path: recorded for ``PeftModel.from_pretrained`` users and model cards.
        task_type: PEFT task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...); None infers it from the model class name.
            It selects PEFT's model class, and SEQ_CLS / TOKEN_CLS / QUESTION_ANS add head names to
            ``modules_to_save`` (whose tensors are then written as well).
        head_modules: module names saved under ``modules_to_save``; by default the modules owning the trainable
            parameters that are not adapter tensors.
        zero_masked: a pruned triplet (``rank_mask`` False) with a nonzero ``lora_E`` is an error by default,
            because leaving it out would change the outputs; True zeroes such triplets in ``model`` (in place)
            first, so that the model and the export agree.

    Returns:
        The directory.

    Raises:
        ValueError: no adapters, an adapter that is not :class:`SVDLinear` or is merged, several
            ``lora_dropout`` values, every layer pruned to rank 0, a trained head that overlaps an adapter, or
            pruned triplets with a nonzero ``lora_E`` (the message names the module). Nothing is written then.
    """
    adapters = find_adapters(model)
    if not adapters:
        raise ValueError(f"{type(model).__name__} has no adapters to export")
    for path, adapter in adapters.items():
        if type(adapter) is not SVDLinear:
            raise ValueError(
                f"export_lora rewrites AdaLoRA (SVDLinear) adapters; {path!r} is a {type(adapter).__name__}"
            )
        if adapter.merged:
            raise ValueError(f"adapter {path!r} is merged into its base weight; unmerge it before export_lora")
    dropouts = {dropout_p(a) for a in adapters.values()}
    if len(dropouts) > 1:
        raise ValueError(f"a LoRA config holds one lora_dropout; the adapters have {sorted(dropouts)}")
    lora_dropout = dropouts.pop()
    ranks = {path: lora_rank(a) for path, a in adapters.items()}
    targeted = [p for p, k in ranks.items() if k > 0]
    pruned = [p for p, k in ranks.items() if k == 0]
    if not targeted:
        raise ValueError(
            f"every adapter of {type(model).__name__} is pruned to rank 0, and LoRA has no rank-0 layer; the model "
            "equals its base model (use a merged export for the trained heads)"
        )
    if task_type is None:
        task_type = infer_peft_task_type(model)
    modules_to_save, head_tensors = peft_modules_to_save(model, adapters, task_type, head_modules)
    # Last check, as with zero_masked=True it changes the model.
    check_pruned_triplets(adapters, "export_lora", zero_masked=zero_masked)

    # Default rank: the most common kept rank (ties: the larger), so that most layers need no pattern entry.
    counts = Counter(ranks[p] for p in targeted)
    r = max(counts, key=lambda k: (counts[k], k))
    keys = pattern_keys([p for p in targeted if ranks[p] != r], targeted)
    # alpha = r per layer makes PEFT's scaling alpha / r exactly 1, the scaling already folded into lora_A.
    rank_pattern = {key: ranks[path] for path, key in keys.items()}

    tensors: dict[str, torch.Tensor] = {}
    for path in targeted:
        lora_a, lora_b = lora_factors(adapters[path])
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = cpu_copy(lora_a)
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = cpu_copy(lora_b)
    tensors.update(head_tensors)

    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "target_modules": peft_target_modules(model, targeted),
        "lora_dropout": lora_dropout,
        # PEFT sets it per layer from the layer type anyway (Conv1D: True); this only avoids its warning.
        "fan_in_fan_out": any(adapters[p].fan_in_fan_out for p in targeted),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": modules_to_save or None,
    }
    directory = write_peft_folder(directory, tensors, peft_config)
    if pruned:
        log.info("export_lora: %d layers pruned to rank 0 carry no update and are left out: %s",
                 len(pruned), ", ".join(pruned))
    log.info("exported %d AdaLoRA layers as LoRA (r=%d, %d in rank_pattern, %d kept ranks in all) to %s",
             len(targeted), r, len(rank_pattern), sum(ranks.values()), directory)
    return directory
