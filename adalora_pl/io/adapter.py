"""Our adapter-only format: :func:`save_adapter` / :func:`load_adapter`.

A small folder (``adapter.safetensors`` + ``adapter_config.json``) holding only the adapter tensors and the
trained heads; ``load_adapter`` rebuilds the adapters on a fresh base model. Every triplet and ``rank_mask`` is
kept, so nothing is sliced. Tensors are read with safetensors only, never unpickled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from adalora_pl.baselines import ADAPTER_CLASSES
from adalora_pl.injection import find_adapters
from adalora_pl.io._common import (
    adapter_state,
    base_linear,
    base_state_key,
    cast_adapter_tensor,
    check_shape,
    cpu_copy,
    dropout_p,
    find_target,
    head_tensor_names,
    json_safe,
    owner_modules,
    read_json,
    read_safetensors,
    refuse_pickles,
    replace_module,
    require_key,
)
from adalora_pl.layers import SVDLinear, linear_shape
from adalora_pl.quantized import compute_dtype, keep_model_exact, quantization_kind

log = logging.getLogger(__name__)


ADAPTER_WEIGHTS_NAME = "adapter.safetensors"


ADAPTER_CONFIG_NAME = "adapter_config.json"


ADAPTER_FORMAT = "adalora-pl/adapter"


ADAPTER_FORMAT_VERSION = 1


# ====================================================================== shared helpers
def _method_of(adapter: nn.Module) -> str:
    for method, cls in ADAPTER_CLASSES.items():
        if type(adapter) is cls:
            return method
    raise ValueError(f"{type(adapter).__name__} is not one of the adapter classes {sorted(ADAPTER_CLASSES)}")


# ====================================================================== adapter-only checkpoint
def save_adapter(
    model: nn.Module,
    directory: str | Path,
    *,
    config: Mapping[str, Any] | None = None,
    head_modules: Iterable[str] | None = None,
) -> Path:
    """Write the adapters and trained heads of ``model`` to ``directory``.

    Files:
        ``adapter.safetensors``: every adapter layer's own tensors under ``<module path>.<name>``
        (``lora_A``, ``lora_E``, ``lora_B``, ``ranknum``, ``rank_mask`` for :class:`SVDLinear`; ``lora_A``,
        ``lora_B`` for :class:`LoRALinear`; whatever a registered baseline holds), plus the head tensors
        under their state-dict names (see :func:`head_tensor_names`).
        ``adapter_config.json``: method, ``init_r`` (AdaLoRA) or ``r`` (LoRA), ``lora_alpha``,
        ``lora_dropout``, ``target_modules``, ``trainable_modules``, ``backbone``, every adapter's module
        path with its current ``r``, ``ranknum`` and kept rank (and, where not the default, its ``scaling`` and
        ``adapter_init: "weight_svd"``), the head tensor names, and ``config`` as given.

    A weight-SVD layer (docs/method.md §13) also stores its initial triplets (``init_lora_A`` / ``_E`` / ``_B``):
    :func:`load_adapter` takes their update out of the fresh base weight, giving back the residual it trained on.

    Args:
        model: the model with adapters (the module whose paths the adapters are named by).
        directory: created if needed; existing files of the same names are overwritten.
        config: the training configuration; read here are ``method``, ``init_r`` / ``r``, ``target_r``,
            ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``trainable_modules`` and the backbone name
            (``backbone``, ``model_name_or_path`` or ``base_model_name_or_path``). Missing values are taken
            from the adapters. The whole mapping is also stored under ``"config"``.
        head_modules: module names whose full state to save instead of the trainable parameters.

    Returns:
        The directory.
    """
    config = dict(config or {})
    adapters = find_adapters(model)
    if not adapters:
        raise ValueError(f"{type(model).__name__} has no adapters to save (inject_adapters first)")
    methods = {_method_of(a) for a in adapters.values()}
    if len(methods) > 1:
        raise ValueError(f"model mixes adapter methods {sorted(methods)}; save_adapter expects one")
    method = methods.pop()
    if config.get("method", method) != method:
        raise ValueError(f"config says method={config['method']!r} but the model's adapters are {method!r}")

    state = model.state_dict(keep_vars=False)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for path, adapter in adapters.items():
        for name, value in adapter_state(adapter).items():
            tensors[f"{path}.{name}"] = cpu_copy(value)
        entry: dict[str, Any] = {
            "r": adapter.r,
            "lora_alpha": adapter.lora_alpha,
            "lora_dropout": dropout_p(adapter),
        }
        if isinstance(adapter, SVDLinear):
            entry["ranknum"] = float(adapter.ranknum.item())
            entry["kept_rank"] = adapter.kept_rank
        # The opt-in options, recorded only where they differ from the defaults (the files of default runs stay as
        # they were): the scaling rule, and a weight-SVD start, whose initial triplets (INITIAL_TENSORS) are among
        # the tensors and give load_adapter the residual base weight back.
        if getattr(adapter, "scaling_rule", "alpha_over_r") != "alpha_over_r":
            entry["scaling"] = adapter.scaling_rule
        if getattr(adapter, "adapter_init", "reference") == "weight_svd":
            entry["adapter_init"] = "weight_svd"
        layers[path] = entry
    heads = head_tensor_names(model, head_modules)
    for key in heads:
        if key in tensors:
            continue
        if key not in state:
            raise ValueError(f"head tensor {key!r} is not in the state dict of {type(model).__name__}")
        tensors[key] = cpu_copy(state[key])

    first = next(iter(adapters.values()))
    if method == "adalora":
        init_r = config.get("init_r", config.get("r"))
        if init_r is None:
            init_r = max(round(layer["ranknum"]) for layer in layers.values())
        rank_fields = {"init_r": int(init_r)}
        if config.get("target_r") is not None:
            rank_fields["target_r"] = int(config["target_r"])
    else:
        rank_fields = {"r": int(config.get("r", first.r))}
    head_modules_list = list(head_modules) if head_modules is not None else None
    trainable = config.get("trainable_modules")
    if trainable is None:
        trainable = head_modules_list if head_modules_list is not None else owner_modules(heads)
    backbone = next(
        (config[k] for k in ("backbone", "model_name_or_path", "base_model_name_or_path") if config.get(k)), None
    )
    meta = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "method": method,
        **rank_fields,
        "lora_alpha": config.get("lora_alpha", first.lora_alpha),
        "lora_dropout": config.get("lora_dropout", dropout_p(first)),
        "target_modules": list(config["target_modules"]) if config.get("target_modules") else list(adapters),
        "trainable_modules": list(trainable),
        "backbone": backbone,
        "model_class": type(model).__name__,
        "adapters": layers,
        "head_tensors": heads,
        "config": json_safe(config),
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(json_safe(meta), indent=2) + "\n", encoding="utf-8")
    log.info("saved %d adapters and %d head tensors to %s", len(adapters), len(heads), directory)
    return directory


def _saved_with_autocast(
    tensors: Mapping[str, torch.Tensor], path: str, base: nn.Module, heads: Iterable[str]
) -> bool:
    """Whether the adapter at ``path`` was saved with ``autocast_adapter_dtype`` (the default): False only
    when its own saved tensors (not trained heads such as a bias) are in its half-precision base's dtype (a
    quantized base's compute dtype)."""
    weight_dtype = compute_dtype(base) if quantization_kind(base) is not None else base.weight.dtype
    heads = set(heads)
    saved = {t.dtype for k, t in tensors.items()
             if k.startswith(path + ".") and k not in heads and t.is_floating_point()}
    return not (weight_dtype in (torch.float16, torch.bfloat16) and weight_dtype in saved)


def _expect_initial_triplets(adapter: nn.Module, entry: Mapping[str, Any], config_path: Path) -> None:
    """Give a layer built for a saved weight-SVD adapter its :data:`~adalora_pl.layers.INITIAL_TENSORS` (zeros of
    the shapes the saved ones must have, ``ranknum`` triplets: compaction never drops initial ones) so that the
    checks below expect them; their values are loaded with the rest, then :meth:`SVDLinear.residualise_base`."""
    if not isinstance(adapter, SVDLinear):
        raise ValueError(f"{config_path}: adapter_init 'weight_svd' is recorded for a {type(adapter).__name__}")
    count = round(float(require_key(entry, "ranknum", config_path)))
    factory = adapter.adapter_factory()
    adapter.register_initial_triplets(torch.zeros(count, adapter.in_features, **factory),
                                      torch.zeros(count, 1, **factory),
                                      torch.zeros(adapter.out_features, count, **factory))


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Rebuild the adapters saved by :func:`save_adapter` on ``model`` (a fresh base model) and load them.

    Everything is checked before the model is touched: both files exist and parse, every adapter path is a
    linear layer of ``model``, every tensor has the shape the base model needs, and no tensor is missing or
    unexpected. After loading, the adapter and head tensors are trainable and the rest is frozen, as after
    :func:`adalora_pl.inject_adapters`.

    Returns:
        ``model``, modified in place.

    Adapter tensors come back in the dtype they were saved in (float32 adapters of a bfloat16 base stay
    float32); head tensors take the model's dtype. A quantized base (bitsandbytes 4-bit / int8, torchao int8)
    keeps running quantized, as in training; another quantized layer is refused with its type named.

    Raises:
        FileNotFoundError: a file of the folder is missing.
        ValueError: only pickled weights (``*.bin``, ``*.pt``: never unpickled), a corrupted file, an adapter
            path missing from the model, a shape mismatch (the message names the tensor and both shapes), or a
            model that already has adapters.
    """
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: adapter folder not found")
    meta = read_json(config_path)
    if meta.get("format") != ADAPTER_FORMAT:
        hint = " (a PEFT adapter folder? use import_peft)" if "peft_type" in meta else ""
        raise ValueError(f"{config_path}: not an adalora-pl adapter config{hint}")
    if int(meta.get("format_version", 0)) > ADAPTER_FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version {meta['format_version']} is newer than this library")
    method = require_key(meta, "method", config_path)
    classes = ADAPTER_CLASSES
    if method not in classes:
        raise ValueError(f"{config_path}: unknown method {method!r} (known: {sorted(classes)})")
    layers = require_key(meta, "adapters", config_path)
    heads = list(meta.get("head_tensors", []))
    if find_adapters(model):
        raise ValueError(f"{type(model).__name__} already has adapters; load_adapter expects a fresh base model")
    refuse_pickles(directory, weights_path, "load_adapter")
    tensors = read_safetensors(weights_path)

    keep_model_exact(model)  # bitsandbytes' CPU repacking of 4-bit layers would cut the adapters' gradients
    # ---- validate everything against the base model before attaching anything. Building an adapter freezes
    # its base layer, so the flags are restored if a check fails.
    layer_cls = classes[method]
    bases: dict[str, nn.Module] = {}
    built: dict[str, nn.Module] = {}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    expected: dict[str, tuple[int, ...]] = {}
    try:
        for path, entry in layers.items():
            base = bases[path] = base_linear(model, path, config_path)
            options = {"scaling": entry["scaling"]} if "scaling" in entry else {}
            built[path] = layer_cls(
                base,
                r=int(require_key(entry, "r", config_path)),
                lora_alpha=entry.get("lora_alpha", meta.get("lora_alpha")),
                lora_dropout=float(entry.get("lora_dropout", meta.get("lora_dropout", 0.0))),
                autocast_adapter_dtype=_saved_with_autocast(tensors, path, base, heads),
                **options,
            )
            if entry.get("adapter_init", "reference") == "weight_svd":
                _expect_initial_triplets(built[path], entry, config_path)
            for name, value in adapter_state(built[path]).items():
                expected[f"{path}.{name}"] = tuple(value.shape)
        base_state = model.state_dict()
        for key in heads:
            base_key = base_state_key(key, layers)
            if base_key not in base_state:
                raise ValueError(f"{weights_path}: head tensor {key!r} does not exist in {type(model).__name__}")
            expected[key] = tuple(base_state[base_key].shape)
        missing = [k for k in expected if k not in tensors]
        if missing:
            raise ValueError(f"{weights_path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        unexpected = [k for k in tensors if k not in expected]
        if unexpected:
            raise ValueError(
                f"{weights_path}: tensors not described by {config_path.name}: {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''}"
            )
        for key, shape in expected.items():
            path = key.rpartition(".")[0]
            what = ""
            if path in bases:
                in_features, out_features, _ = linear_shape(bases[path])
                what = f"{path} is {type(bases[path]).__name__} in={in_features}, out={out_features}"
            check_shape(weights_path, key, tensors[key], shape, what)
    except (ValueError, TypeError, RuntimeError):
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))
        raise

    # ---- attach and load
    model.requires_grad_(False)
    for path, adapter in built.items():
        # Adapters come back in the dtype they were saved in (e.g. float32 adapters of a bfloat16 base).
        for name in adapter_state(adapter):
            stored = tensors[f"{path}.{name}"]
            if stored.is_floating_point():
                cast_adapter_tensor(adapter, name, stored.dtype)
        # Only the adapter's own parameters: a quantized base's integer weight cannot even be asked to.
        for p in adapter.adapter_parameters():
            p.requires_grad_(True)
        replace_module(model, path, adapter)
    with torch.no_grad():
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for key, value in tensors.items():
            target = find_target(key, params, buffers, layers)
            if target is None:  # cannot happen after the checks above; keep the message clear anyway
                raise ValueError(f"{weights_path}: tensor {key!r} has no place in the model")
            target.copy_(value.to(dtype=target.dtype))
            if key in heads and isinstance(target, nn.Parameter):
                target.requires_grad_(True)
        for adapter in built.values():
            if getattr(adapter, "adapter_init", "reference") == "weight_svd":
                adapter.residualise_base()  # the fresh base weight minus the saved initial triplets' update
    log.info("loaded %d %s adapters and %d head tensors from %s", len(layers), method, len(heads), directory)
    return model
