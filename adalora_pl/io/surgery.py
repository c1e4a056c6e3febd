"""Model surgery on trained adapters: merging, compaction, and the check both rely on.

- :func:`merge_adapters`: fold every adapter into its base weight and put the plain layer back, leaving an
  ordinary transformers model for ``save_pretrained``; a quantized base comes out dequantized (docs/method.md §11).
- :func:`compact_adapters`: physically drop pruned triplets (rank_mask False) from every :class:`SVDLinear`,
  optionally rewriting an optimizer's parameters and state so training can go on.
- :func:`check_pruned_triplets`: dropping pruned triplets only preserves the outputs when their singular values
  are zero; compaction and the PEFT export refuse (ValueError) a pruned triplet whose ``lora_E`` is not zero,
  unless called with ``zero_masked=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from adalora_pl import quantized
from adalora_pl.injection import find_adapters, inside_any
from adalora_pl.io._common import replace_module
from adalora_pl.layers import SVDLinear

log = logging.getLogger(__name__)


def _masked_nonzero(adapter: SVDLinear) -> int:
    """How many triplets ``rank_mask`` marks as pruned still carry a nonzero singular value."""
    pruned = ~adapter.rank_mask.view(-1, 1).to(adapter.lora_E.device)
    return int((pruned & (adapter.lora_E != 0)).sum())


@torch.no_grad()
def check_pruned_triplets(
    model: nn.Module | Mapping[str, nn.Module], action: str, *, zero_masked: bool = False
) -> None:
    """Refuse a model whose pruned triplets (``rank_mask`` False) do not all have ``lora_E == 0``.

    Slicing by ``rank_mask`` (:func:`export_peft`, :func:`compact_adapters`) only preserves the outputs when
    every pruned triplet has E = 0. That holds while the allocator re-applies its pattern after every step,
    but not, e.g., when triplets masked at the last mask event trained back (``tfinal=0`` with
    ``delta_t > 1``): the slice would then silently change the model.

    Args:
        model: a model with adapters (only :class:`SVDLinear` layers are looked at), or the mapping of
            its adapters by path.
        action: how the error message starts (the operation refused).
        zero_masked: instead of refusing, zero such triplets in ``model`` (in place), as the allocator's
            ``apply_rank_pattern()`` would; a merged adapter is still refused. Nothing is changed before
            every layer has been checked.

    Raises:
        ValueError: naming the layers and the number of such triplets in each.
    """
    adapters = model if isinstance(model, Mapping) else find_adapters(model)
    offenders = {path: n for path, a in adapters.items() if isinstance(a, SVDLinear) and (n := _masked_nonzero(a))}
    if not offenders:
        return
    listed = ", ".join(f"{path} ({n})" for path, n in list(offenders.items())[:5])
    more = f" and {len(offenders) - 5} more layers" if len(offenders) > 5 else ""
    total = sum(offenders.values())
    if not zero_masked:
        raise ValueError(
            f"{action}: {total} triplets pruned by rank_mask still have a nonzero lora_E, in {listed}{more}; "
            "leaving them out would change the model's outputs. Apply the rank pattern first "
            "(RankAllocator.apply_rank_pattern(), or re-run with the AdaLoRA callback, which leaves pruned "
            "triplets at zero), or pass zero_masked=True to zero them in the model"
        )
    merged = [path for path in offenders if adapters[path].merged]
    if merged:  # its weight holds the old delta: zeroing E now would make a later unmerge wrong
        raise ValueError(f"{action}: adapter {merged[0]!r} is merged; unmerge it before zero_masked=True")
    log.warning("%s: zeroing %d pruned triplets with a nonzero lora_E in %s%s", action, total, listed, more)
    for path in offenders:
        adapter = adapters[path]
        adapter.lora_E.masked_fill_(~adapter.rank_mask.view(-1, 1).to(adapter.lora_E.device), 0.0)


# ====================================================================== merge
@torch.no_grad()
def merge_adapters(model: nn.Module, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every adapter into its base weight and put the plain base layer back in its place.

    The result has no adapter modules left: a plain model (for transformers models, ready for
    ``save_pretrained``) whose outputs equal the adapted model's within float rounding. The
    ``requires_grad`` flags of the base layers are left as they were (frozen after injection).

    Adapters in another dtype than their base weight (float32 adapters of a bfloat16 model) are added in
    the wider dtype and rounded once to the weight's: ``(W.float() + delta).to(W.dtype)``, as PEFT's
    ``merge_and_unload`` does. Already merged adapters are only unwrapped.

    A quantized base (bitsandbytes 4-bit / int8, torchao int8; :mod:`adalora_pl.quantized`) cannot hold the update:
    its layers are dequantized exactly to float32, the adapter's update added in float32, and the sum rounded once
    into a plain ``nn.Linear``. The quantized layers that carry no adapter are dequantized as well, so the result is
    one plain, unquantized model (re-quantize it on load if wanted), and a transformers model loses its quantization
    markers (``config.quantization_config``, ``hf_quantizer``, ``is_loaded_in_4bit`` ...) so that
    ``save_pretrained`` writes, and ``from_pretrained`` reads, an ordinary checkpoint. Everything is checked before
    the model changes: a quantized module that cannot be dequantized (another scheme, a bitsandbytes 4-bit layer
    repacked by its CPU inference kernel) is refused.

    Args:
        dtype: the dtype of the layers that were quantized. None: the dtype each was quantized from, where the layer
            records it (bitsandbytes 4-bit, torchao), else the model's (``config.dtype``, or its first unquantized
            floating-point parameter): the dtype its other layers, hence the activations, have. Not the 4-bit
            compute dtype, which is only the precision of the quantized matmul, whose output is cast back.

    Returns:
        ``model``, modified in place.

    Raises:
        ValueError: an adapter without a weight delta (bottleneck adapters), or a quantized module that cannot be
            dequantized. The model is not changed then.
    """
    adapters = find_adapters(model)
    for path, adapter in adapters.items():  # check every adapter can merge before changing any weight
        try:
            adapter.delta_weight()
        except NotImplementedError as err:
            raise ValueError(f"adapter {path!r} ({type(adapter).__name__}) has no weight delta to merge") from err
    plain_quantized = _unadapted_quantized(model, adapters)
    fallback = dtype or _model_dtype(model)
    # Deepest paths first, so that replacing a module never invalidates a path still to come.
    for path in sorted(adapters, key=lambda p: p.count("."), reverse=True):
        adapter = adapters[path]
        if adapter.quantization is not None:
            base = adapter.base_layer
            layer_dtype = dtype or quantized.plain_dtype(base) or fallback
            replace_module(model, path, quantized.dequantized_linear(base, layer_dtype, adapter.delta_weight()))
            continue
        if not adapter.merged:
            _fold_delta(adapter)
        replace_module(model, path, adapter.base_layer)
    for path, layer in plain_quantized.items():
        layer_dtype = dtype or quantized.plain_dtype(layer) or fallback
        replace_module(model, path, quantized.dequantized_linear(layer, layer_dtype))
    if plain_quantized or any(a.quantization is not None for a in adapters.values()):
        _drop_quantization_markers(model)
    log.info("merged %d adapters into %s%s", len(adapters), type(model).__name__,
             f" and dequantized {len(plain_quantized)} unadapted quantized layers" if plain_quantized else "")
    return model


def _unadapted_quantized(model: nn.Module, adapters: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """The quantized linears of ``model`` outside the adapters, by path; a ValueError naming every quantized module
    that cannot be dequantized (and the adapted layers that cannot)."""
    found: dict[str, nn.Module] = {}
    refused: list[str] = []
    for path, module in model.named_modules():
        if path in adapters:
            if adapters[path].quantization is not None:  # repacked since injection, say
                reason = quantized.unsupported_reason(adapters[path].base_layer)
                if reason is not None:
                    refused.append(f"{path}.base_layer ({reason})")
            continue
        if inside_any(path, list(adapters)) is not None or next(module.children(), None) is not None:
            continue  # inside an adapter, or a container: its leaves are looked at
        reason = quantized.unsupported_reason(module)
        if reason is not None:
            refused.append(f"{path} ({type(module).__name__}: {reason})")
        elif quantized.is_quantized(module):
            found[path] = module
    if refused:
        raise ValueError(
            f"merge_adapters writes a plain model, but it cannot dequantize {', '.join(refused[:3])}"
            f"{f' and {len(refused) - 3} more' if len(refused) > 3 else ''}; nothing was changed"
        )
    return found


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s unquantized layers: ``config.dtype`` of a transformers model, else its first plain
    floating-point parameter's dtype, else float32."""
    configured = getattr(getattr(model, "config", None), "dtype", None)
    if isinstance(configured, torch.dtype):
        return configured
    for p in model.parameters():
        if type(p) in (torch.Tensor, nn.Parameter) and p.is_floating_point():
            return p.dtype
    return torch.float32


def _drop_quantization_markers(model: nn.Module) -> None:
    """Make every transformers model inside ``model`` an unquantized one, as transformers' own ``dequantize`` does:
    ``save_pretrained`` would otherwise write ``quantization_config`` and ``from_pretrained`` expect quantized
    tensors; PEFT reads ``is_loaded_in_4bit`` / ``is_loaded_in_8bit`` to choose its quantized layers."""
    for module in model.modules():
        quantizer = getattr(module, "hf_quantizer", None)
        if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
            quantizer.remove_quantization_config(module)
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
        for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
            if getattr(module, flag, False) is True:
                setattr(module, flag, False)


def _fold_delta(adapter: nn.Module) -> None:
    """``base_layer.weight`` += the adapter's delta, computed in the wider of both dtypes and rounded once.

    Casting a float32 delta to a bfloat16 weight before adding would round twice; PEFT's
    ``weight.data += delta`` promotes instead, and merged weights should equal PEFT's bit for bit.
    """
    weight = adapter.base_layer.weight
    delta = adapter.delta_weight()
    delta = delta.T if adapter.fan_in_fan_out else delta  # Conv1D stores its weight as (in, out)
    wide = torch.promote_types(weight.dtype, delta.dtype)
    weight.copy_(weight.to(wide) + delta.to(device=weight.device, dtype=wide))


# ====================================================================== compaction
@torch.no_grad()
def compact_adapters(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, zero_masked: bool = False
) -> dict[str, int]:
    """Physically drop the pruned triplets (``rank_mask`` False) of every :class:`SVDLinear` of ``model``.

    Slices the rows of ``lora_A`` and ``lora_E``, the columns of ``lora_B`` and ``rank_mask`` (then all True),
    sets ``r`` to the kept rank and keeps ``ranknum`` (so the scaling, and hence the outputs, do not change:
    a pruned triplet has E = 0). A layer compacted to rank 0 returns its base layer's output. The new
    parameters keep the adapters' dtype and device (which may differ from the base layer's).

    A pruned triplet whose ``lora_E`` is not zero (it trained back after its last mask) would change the
    outputs when dropped: that is a ValueError naming the layers, raised before anything changes, unless
    ``zero_masked=True``, which zeroes such triplets first.

    With ``optimizer``, the new parameter objects replace the old ones in its param groups and every state
    tensor shaped like the parameter (Adam's ``exp_avg`` / ``exp_avg_sq``, SGD's momentum) is sliced the
    same way, so training continues. Learning-rate schedulers keep working (they hold the optimizer).

    Warning:
        Only compact in the frozen final phase (after ``total_step - tfinal``) or after training. A
        :class:`adalora_pl.RankAllocator` built before compaction must not be used afterwards: its flat
        importance buffers and parameter list are sized and bound to the old ranks. Under DDP, compaction
        changes parameter shapes and needs a fresh wrapper.

    Returns:
        The new rank of every :class:`SVDLinear`, by module path.
    """
    adapters = {p: a for p, a in find_adapters(model).items() if isinstance(a, SVDLinear)}
    check_pruned_triplets(adapters, "compact_adapters", zero_masked=zero_masked)
    replacements: dict[int, tuple[nn.Parameter, nn.Parameter, int, torch.Tensor]] = {}
    ranks: dict[str, int] = {}
    for path, adapter in adapters.items():
        keep = adapter.rank_mask.nonzero().view(-1).to(adapter.lora_A.device)
        if keep.numel() == adapter.r:
            ranks[path] = adapter.r
            continue
        # A merged adapter stays merged as it is: the dropped triplets have E = 0, so its delta does not
        # change, and an unmerge / merge round trip would only add rounding (in bfloat16, a lot of it).
        for name, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            old = getattr(adapter, name)
            # index_select keeps old's dtype and device: float32 adapters of a bfloat16 base stay float32.
            new = nn.Parameter(old.detach().index_select(dim, keep).clone(), requires_grad=old.requires_grad)
            setattr(adapter, name, new)
            replacements[id(old)] = (old, new, dim, keep)
        adapter.rank_mask = adapter.rank_mask[keep.to(adapter.rank_mask.device)].clone()
        adapter.r = int(keep.numel())
        ranks[path] = adapter.r
    if optimizer is not None and replacements:
        _rebind_optimizer(optimizer, replacements)
    log.info("compacted %d SVDLinear layers; kept ranks total %d", len(replacements) // 3, sum(ranks.values()))
    return ranks


def _rebind_optimizer(optimizer: torch.optim.Optimizer, replacements: Mapping[int, tuple]) -> None:
    for group in optimizer.param_groups:
        group["params"] = [replacements[id(p)][1] if id(p) in replacements else p for p in group["params"]]
    for old, new, dim, keep in replacements.values():
        if old not in optimizer.state:
            continue
        state = optimizer.state.pop(old)
        sliced = {}
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == old.shape:
                sliced[key] = value.index_select(dim, keep.to(value.device)).clone()
            elif torch.is_tensor(value) and value.dim() > 0 and value.numel() > 1:
                raise ValueError(
                    f"optimizer state {key!r} of shape {tuple(value.shape)} is not shaped like its parameter "
                    f"{tuple(old.shape)}; compact_adapters cannot slice it ({type(optimizer).__name__})"
                )
            else:
                sliced[key] = value
        optimizer.state[new] = sliced
