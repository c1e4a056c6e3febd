"""Getting a trained model out: adapter-only checkpoints, PEFT's AdaLoRA format, merging and compaction.

Four independent tools, all working on a model that carries our adapters (:func:`adalora_pl.inject_adapters`):

- :func:`save_adapter` / :func:`load_adapter`: a small folder (``adapter.safetensors`` + ``adapter_config.json``)
  holding only the adapter tensors and the trained heads; ``load_adapter`` rebuilds the adapters on a fresh
  base model. Tensors are read with safetensors only, never unpickled.
- :func:`export_peft` / :func:`import_peft`: the folder layout of PEFT's ``save_pretrained`` for AdaLoRA
  (docs/method.md §8), so ``peft.PeftModel.from_pretrained(base, folder)`` gives the same outputs, and back.
- :func:`merge_adapters`: fold every adapter into its base weight and put the plain layer back, leaving an
  ordinary transformers model for ``save_pretrained``.
- :func:`compact_adapters`: physically drop pruned triplets (rank_mask False) from every :class:`SVDLinear`,
  optionally rewriting an optimizer's parameters and state so training can go on.

``export_peft`` and ``compact_adapters`` drop pruned triplets, which only preserves the outputs when their
singular values are zero; both refuse (ValueError) a pruned triplet whose ``lora_E`` is not zero, unless
called with ``zero_masked=True``. ``save_adapter`` keeps every triplet and ``rank_mask``, so it needs no check.

PEFT format, as read from peft 0.21 and checked by the tests:

- ``adapter_model.safetensors`` keys: ``base_model.model.<module path>.lora_A`` / ``.lora_E`` / ``.lora_B``
  (no adapter name, no ``.weight``, no ranknum). With a rank pattern only the kept triplets are stored.
- ``rank_pattern`` in ``adapter_config.json``: ``{"<module path>.lora_E": [bool] * init_r}``; the key is the
  path inside the transformers model (no ``base_model.model.`` prefix, no adapter name). On load PEFT builds
  every layer at ``init_r``, resizes it to ``sum(pattern)`` and keeps ``ranknum = init_r`` (so the scaling
  ``lora_alpha / (init_r + 1e-5)`` is unchanged).
- ``modules_to_save`` entries match module names by plain suffix (``name.endswith(entry)``); their tensors are
  stored as ``base_model.model.<module path>.<state key>``, without the wrapper's ``modules_to_save.default``.
  ``task_type`` SEQ_CLS / TOKEN_CLS add ``classifier`` and ``score``, QUESTION_ANS adds ``qa_outputs``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adalora_pl import injection
from adalora_pl.injection import find_adapters, is_linear
from adalora_pl.layers import LoRALinear, SVDLinear, linear_shape

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS_NAME = "adapter.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_FORMAT = "adalora-pl/adapter"
ADAPTER_FORMAT_VERSION = 1

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."

# Module names PEFT adds to modules_to_save by itself for these task types (peft_model.py).
PEFT_IMPLICIT_MODULES_TO_SAVE = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}

# ====================================================================== shared helpers
def _adapter_classes() -> dict[str, type[nn.Module]]:
    """Method name -> adapter class, including baselines registered with ``register_adapter``."""
    return dict(getattr(injection, "ADAPTER_CLASSES", {"adalora": SVDLinear, "lora": LoRALinear}))


def _method_of(adapter: nn.Module) -> str:
    for method, cls in _adapter_classes().items():
        if type(adapter) is cls:
            return method
    raise ValueError(f"{type(adapter).__name__} is not a registered adapter class (see register_adapter)")


def _adapter_state(adapter: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's own tensors (parameters and buffers), without its wrapped ``base_layer``."""
    return {k: v for k, v in adapter.state_dict().items() if not k.startswith("base_layer.")}


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses shared or non-contiguous storage: give every tensor its own contiguous CPU copy.
    return t.detach().to("cpu").contiguous().clone()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on CPU; a ValueError naming the file when it cannot be parsed."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError (an Exception subclass)
        raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from err


def _require(config: Mapping, key: str, path: Path) -> Any:
    if key not in config:
        raise ValueError(f"{path}: missing field {key!r}")
    return config[key]


def _base_linear(model: nn.Module, module_path: str, source: Path) -> nn.Module:
    """The linear layer at ``module_path`` of a model without adapters, or a clear error."""
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        module = None
    if module is None:
        raise ValueError(
            f"{source}: adapter module {module_path!r} does not exist in {type(model).__name__}; "
            "is this the base model the adapter was trained on?"
        )
    if not is_linear(module):
        raise ValueError(
            f"{source}: adapter module {module_path!r} is a {type(module).__name__} in {type(model).__name__}, "
            "not a linear layer"
        )
    return module


def _check_shape(source: Path, key: str, found: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(found.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(
            f"{source}: tensor {key!r} has shape {tuple(found.shape)} but the base model needs "
            f"{tuple(expected)}{extra}"
        )


def _replace_module(model: nn.Module, module_path: str, new: nn.Module) -> None:
    parent_name, _, child = module_path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def head_tensor_names(model: nn.Module, head_modules: Iterable[str] | None = None) -> list[str]:
    """State-dict keys of the trained heads of ``model``.

    Without ``head_modules``: every parameter with ``requires_grad`` that is not an adapter tensor (a
    tensor of an adapter layer outside its ``base_layer``). With ``head_modules``: the full state
    (parameters and buffers) of those modules, named by module path.
    """
    if head_modules is None:
        adapter_keys = {f"{path}.{k}" for path, a in find_adapters(model).items() for k in _adapter_state(a)}
        return [n for n, p in model.named_parameters() if p.requires_grad and n not in adapter_keys]
    names: list[str] = []
    for module_name in head_modules:
        try:
            module = model.get_submodule(module_name)
        except AttributeError as err:
            raise ValueError(f"head module {module_name!r} does not exist in {type(model).__name__}") from err
        names.extend(f"{module_name}.{k}" for k in module.state_dict())
    return list(dict.fromkeys(names))


def _json_safe(value: Any) -> Any:
    """``value`` converted to something ``json.dumps`` writes (tuples to lists, paths and others to str)."""
    return json.loads(json.dumps(value, default=str))


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


@torch.no_grad()
def _cast_adapter_tensor(adapter: nn.Module, name: str, dtype: torch.dtype) -> None:
    """Give the adapter's own parameter or buffer ``name`` (a state-dict key) the dtype ``dtype``.

    Replaces the tensor object (as PEFT's autocast does), so only use it before an optimizer holds it.
    """
    owner_name, _, attr = name.rpartition(".")
    owner = adapter.get_submodule(owner_name) if owner_name else adapter
    current = getattr(owner, attr)
    if current.dtype == dtype or not current.is_floating_point():
        return
    if isinstance(current, nn.Parameter):
        setattr(owner, attr, nn.Parameter(current.detach().to(dtype), requires_grad=current.requires_grad))
    else:
        setattr(owner, attr, current.to(dtype))  # a registered buffer stays registered under its name


# Files of torch.save / pickle that an adapter folder may hold instead of safetensors; never loaded here.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _refuse_pickles(directory: Path, weights_path: Path, reader: str) -> None:
    """A clear refusal when ``weights_path`` is missing but pickled weights sit next to it."""
    if weights_path.is_file():
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{directory}: no {weights_path.name}, only pickled weights ({', '.join(pickles[:3])}); {reader} reads "
            "safetensors only and never unpickles a file. Re-save the adapter with safetensors (PEFT: "
            "save_pretrained(..., safe_serialization=True)) from an environment you trust"
        )


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
        path with its current ``r``, ``ranknum`` and kept rank, the head tensor names, and ``config`` as given.

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
        for name, value in _adapter_state(adapter).items():
            tensors[f"{path}.{name}"] = _cpu_copy(value)
        entry: dict[str, Any] = {
            "r": adapter.r,
            "lora_alpha": adapter.lora_alpha,
            "lora_dropout": _dropout_p(adapter),
        }
        if isinstance(adapter, SVDLinear):
            entry["ranknum"] = float(adapter.ranknum.item())
            entry["kept_rank"] = adapter.kept_rank
        layers[path] = entry
    heads = head_tensor_names(model, head_modules)
    for key in heads:
        if key in tensors:
            continue
        if key not in state:
            raise ValueError(f"head tensor {key!r} is not in the state dict of {type(model).__name__}")
        tensors[key] = _cpu_copy(state[key])

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
        trainable = head_modules_list if head_modules_list is not None else _owner_modules(heads)
    backbone = next(
        (config[k] for k in ("backbone", "model_name_or_path", "base_model_name_or_path") if config.get(k)), None
    )
    meta = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "method": method,
        **rank_fields,
        "lora_alpha": config.get("lora_alpha", first.lora_alpha),
        "lora_dropout": config.get("lora_dropout", _dropout_p(first)),
        "target_modules": list(config["target_modules"]) if config.get("target_modules") else list(adapters),
        "trainable_modules": list(trainable),
        "backbone": backbone,
        "model_class": type(model).__name__,
        "adapters": layers,
        "head_tensors": heads,
        "config": _json_safe(config),
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(_json_safe(meta), indent=2) + "\n", encoding="utf-8")
    log.info("saved %d adapters and %d head tensors to %s", len(adapters), len(heads), directory)
    return directory


def _dropout_p(adapter: nn.Module) -> float:
    dropout = adapter.lora_dropout
    return float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0


def _owner_modules(tensor_names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(name.rpartition(".")[0] for name in tensor_names))


def _find_target(key: str, params: Mapping, buffers: Mapping, adapter_paths: Iterable[str]) -> torch.Tensor | None:
    """The parameter or buffer of the adapted model that ``key`` names; a key given relative to the base
    model (``<adapter path>.bias``) is also found under ``<adapter path>.base_layer.bias``."""
    for candidate in (key, *(f"{p}.base_layer.{key[len(p) + 1:]}" for p in adapter_paths if key.startswith(p + "."))):
        if candidate in params:
            return params[candidate]
        if candidate in buffers:
            return buffers[candidate]
    return None


def _base_key(key: str, adapter_paths: Iterable[str]) -> str:
    """The key a base model (no adapters) has for ``key`` (``<adapter>.base_layer.x`` -> ``<adapter>.x``)."""
    for path in adapter_paths:
        prefix = path + ".base_layer."
        if key.startswith(prefix):
            return f"{path}.{key[len(prefix):]}"
    return key


def _saved_with_autocast(
    tensors: Mapping[str, torch.Tensor], path: str, base: nn.Module, heads: Iterable[str]
) -> bool:
    """Whether the adapter at ``path`` was saved with ``autocast_adapter_dtype`` (the default): False only
    when its own saved tensors (not trained heads such as a bias) are in its half-precision base's dtype."""
    weight_dtype, heads = base.weight.dtype, set(heads)
    saved = {t.dtype for k, t in tensors.items()
             if k.startswith(path + ".") and k not in heads and t.is_floating_point()}
    return not (weight_dtype in (torch.float16, torch.bfloat16) and weight_dtype in saved)


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Rebuild the adapters saved by :func:`save_adapter` on ``model`` (a fresh base model) and load them.

    Everything is checked before the model is touched: both files exist and parse, every adapter path is a
    linear layer of ``model``, every tensor has the shape the base model needs, and no tensor is missing or
    unexpected. After loading, the adapter and head tensors are trainable and the rest is frozen, as after
    :func:`adalora_pl.inject_adapters`.

    Returns:
        ``model``, modified in place.

    Adapter tensors come back in the dtype they were saved in (float32 adapters of a bfloat16 base stay
    float32); head tensors take the model's dtype.

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
    meta = _read_json(config_path)
    if meta.get("format") != ADAPTER_FORMAT:
        hint = " (a PEFT adapter folder? use import_peft)" if "peft_type" in meta else ""
        raise ValueError(f"{config_path}: not an adalora-pl adapter config{hint}")
    if int(meta.get("format_version", 0)) > ADAPTER_FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version {meta['format_version']} is newer than this library")
    method = _require(meta, "method", config_path)
    classes = _adapter_classes()
    if method not in classes:
        raise ValueError(f"{config_path}: unknown method {method!r} (known: {sorted(classes)}; register it first)")
    layers = _require(meta, "adapters", config_path)
    heads = list(meta.get("head_tensors", []))
    if find_adapters(model):
        raise ValueError(f"{type(model).__name__} already has adapters; load_adapter expects a fresh base model")
    _refuse_pickles(directory, weights_path, "load_adapter")
    tensors = _read_safetensors(weights_path)

    # ---- validate everything against the base model before attaching anything. Building an adapter freezes
    # its base layer, so the flags are restored if a check fails.
    layer_cls = classes[method]
    bases: dict[str, nn.Module] = {}
    built: dict[str, nn.Module] = {}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    expected: dict[str, tuple[int, ...]] = {}
    try:
        for path, entry in layers.items():
            base = bases[path] = _base_linear(model, path, config_path)
            built[path] = layer_cls(
                base,
                r=int(_require(entry, "r", config_path)),
                lora_alpha=entry.get("lora_alpha", meta.get("lora_alpha")),
                lora_dropout=float(entry.get("lora_dropout", meta.get("lora_dropout", 0.0))),
                autocast_adapter_dtype=_saved_with_autocast(tensors, path, base, heads),
            )
            for name, value in _adapter_state(built[path]).items():
                expected[f"{path}.{name}"] = tuple(value.shape)
        base_state = model.state_dict()
        for key in heads:
            base_key = _base_key(key, layers)
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
            _check_shape(weights_path, key, tensors[key], shape, what)
    except (ValueError, TypeError):
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))
        raise

    # ---- attach and load
    model.requires_grad_(False)
    for path, adapter in built.items():
        # Adapters come back in the dtype they were saved in (e.g. float32 adapters of a bfloat16 base).
        for name in _adapter_state(adapter):
            stored = tensors[f"{path}.{name}"]
            if stored.is_floating_point():
                _cast_adapter_tensor(adapter, name, stored.dtype)
        adapter.requires_grad_(True)
        adapter.base_layer.requires_grad_(False)
        _replace_module(model, path, adapter)
    with torch.no_grad():
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for key, value in tensors.items():
            target = _find_target(key, params, buffers, layers)
            if target is None:  # cannot happen after the checks above; keep the message clear anyway
                raise ValueError(f"{weights_path}: tensor {key!r} has no place in the model")
            target.copy_(value.to(dtype=target.dtype))
            if key in heads and isinstance(target, nn.Parameter):
                target.requires_grad_(True)
    log.info("loaded %d %s adapters and %d head tensors from %s", len(layers), method, len(heads), directory)
    return model


# ====================================================================== PEFT format
def infer_peft_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a transformers model class, from its name (None when not recognised)."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if name.endswith("ForQuestionAnswering"):
        return "QUESTION_ANS"
    is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if is_encoder_decoder and (name.endswith("ForConditionalGeneration") or name.endswith("Seq2SeqLM")):
        return "SEQ_2_SEQ_LM"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    return None


def _peft_suffix_match(module_path: str, entries: Iterable[str]) -> bool:
    # PEFT's modules_to_save rule: a plain string suffix test on the name inside the PeftModel.
    full = PEFT_PREFIX + module_path
    return any(full.endswith(entry) for entry in entries)


def export_peft(
    model: nn.Module,
    directory: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    total_step: int | None = None,
    tinit: int = 0,
    tfinal: int = 0,
    target_r: int | None = None,
    delta_t: int = 1,
    beta1: float = 0.85,
    beta2: float = 0.85,
    orth_reg_weight: float = 0.1,
    head_modules: Iterable[str] | None = None,
    zero_masked: bool = False,
) -> Path:
    """Write ``model``'s AdaLoRA adapters as a PEFT adapter folder (``adapter_config.json`` +
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base, directory)`` loads.

    The rank pattern is each layer's ``rank_mask`` (padded with False to ``init_r`` for a compacted layer);
    only the kept triplets are written, as PEFT does. All layers must share ``ranknum`` (PEFT's ``init_r``,
    which fixes the scaling), ``lora_alpha`` and ``lora_dropout``.

    Args:
        model: a model with :class:`SVDLinear` adapters.
        directory: output folder (created).
        base_model_name_or_path: recorded for ``PeftModel.from_pretrained`` users and model cards.
        task_type: PEFT task type (``"SEQ_CLS"``, ...); None infers it from the model class name. It matters:
            it selects PEFT's model class, and SEQ_CLS / TOKEN_CLS / QUESTION_ANS add head names to
            ``modules_to_save`` (whose tensors are then written as well).
        total_step, tinit, tfinal, target_r, delta_t, beta1, beta2, orth_reg_weight: AdaLoRA schedule
            fields of the config; they only matter to whoever continues training with PEFT. ``total_step``
            defaults to ``tinit + tfinal + 1`` and must exceed ``tinit + tfinal``; ``target_r`` defaults to
            the mean kept rank.
        head_modules: module names saved under ``modules_to_save``; by default the modules owning the
            trainable parameters that are not adapter tensors.
        zero_masked: a pruned triplet (``rank_mask`` False) with a nonzero ``lora_E`` is an error by default,
            because leaving it out of the folder would change the outputs; True zeroes such triplets in
            ``model`` (in place) first, so that the model and the export agree.

    Tensors keep their dtype (float32 adapters of a bfloat16 base stay float32, as PEFT keeps them).

    Returns:
        The directory.

    Raises:
        ValueError: no :class:`SVDLinear` adapters, a merged adapter, settings PEFT cannot represent (several
            ranknum / lora_alpha / lora_dropout values, lora_alpha <= 0, total_step <= tinit + tfinal), a
            trained head that overlaps an adapter, or pruned triplets with a nonzero ``lora_E``. Nothing is
            written then.
    """
    adapters = find_adapters(model)
    if not adapters:
        raise ValueError(f"{type(model).__name__} has no adapters to export")
    not_svd = [p for p, a in adapters.items() if type(a) is not SVDLinear]
    if not_svd:
        raise ValueError(f"export_peft writes AdaLoRA (SVDLinear) adapters; these are not: {not_svd[:3]}")
    ranknums = {float(a.ranknum.item()) for a in adapters.values()}
    if len(ranknums) > 1:
        raise ValueError(f"PEFT has one init_r for all layers; the adapters have ranknum values {sorted(ranknums)}")
    ranknum = ranknums.pop()
    init_r = round(ranknum)
    if init_r != ranknum or init_r < 1:
        raise ValueError(f"ranknum {ranknum} is not a positive integer; PEFT cannot reproduce this scaling")
    alphas = {a.lora_alpha for a in adapters.values()}
    dropouts = {_dropout_p(a) for a in adapters.values()}
    if len(alphas) > 1 or len(dropouts) > 1:
        raise ValueError(f"PEFT needs one lora_alpha and one lora_dropout; found {sorted(alphas)}, {sorted(dropouts)}")
    lora_alpha, lora_dropout = alphas.pop(), dropouts.pop()
    if lora_alpha <= 0:
        raise ValueError(f"PEFT replaces lora_alpha <= 0 by init_r; cannot export lora_alpha={lora_alpha}")
    if total_step is None:
        total_step = tinit + tfinal + 1
    if total_step <= tinit + tfinal:
        raise ValueError(f"total_step ({total_step}) must exceed tinit + tfinal ({tinit} + {tfinal})")
    if task_type is None:
        task_type = infer_peft_task_type(model)
    merged = [p for p, a in adapters.items() if a.merged]
    if merged:
        raise ValueError(f"adapter {merged[0]!r} is merged into its base weight; unmerge it before export_peft")

    # modules_to_save: the heads, plus whatever PEFT's suffix rule (and the task type) will wrap on load.
    heads = head_tensor_names(model, head_modules)
    modules_to_save = list(head_modules) if head_modules is not None else _owner_modules(heads)
    if "" in modules_to_save:
        raise ValueError("a trainable parameter sits on the root module; PEFT's modules_to_save cannot hold it")
    entries = modules_to_save + PEFT_IMPLICIT_MODULES_TO_SAVE.get(task_type or "", [])
    wrapped = [n for n, _ in model.named_modules(remove_duplicate=False) if n and _peft_suffix_match(n, entries)]
    for name in wrapped:
        clash = [p for p in adapters if p == name or p.startswith(name + ".") or name.startswith(p + ".")]
        if clash:
            raise ValueError(
                f"module {name!r} would be a PEFT modules_to_save entry but overlaps adapter {clash[0]!r}"
            )
    # Last check, as with zero_masked=True it changes the model.
    check_pruned_triplets(adapters, "export_peft", zero_masked=zero_masked)

    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, list[bool]] = {}
    kept_total = 0
    for path, adapter in adapters.items():
        keep = adapter.rank_mask.nonzero().view(-1)
        kept_total += keep.numel()
        rank_pattern[f"{path}.lora_E"] = adapter.rank_mask.tolist() + [False] * (init_r - adapter.r)
        prefix = f"{PEFT_PREFIX}{path}"
        tensors[f"{prefix}.lora_A"] = _cpu_copy(adapter.lora_A[keep])
        tensors[f"{prefix}.lora_E"] = _cpu_copy(adapter.lora_E[keep])
        tensors[f"{prefix}.lora_B"] = _cpu_copy(adapter.lora_B[:, keep])
    if target_r is None:
        target_r = round(kept_total / len(adapters))
    for name in wrapped:
        for key, value in model.get_submodule(name).state_dict().items():
            tensors[f"{PEFT_PREFIX}{name}.{key}"] = _cpu_copy(value)

    # target_modules: the exact module paths, or an anchored regex if a path is also a suffix of another name.
    names = [n for n, _ in model.named_modules()]
    ambiguous = any(n != p and n.endswith("." + p) for p in adapters for n in names)
    target_modules: list[str] | str = list(adapters)
    if ambiguous:
        target_modules = "^(?:" + "|".join(re.escape(p) for p in adapters) + ")$"

    peft_config = {
        "peft_type": "ADALORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "init_r": init_r,
        "target_r": int(target_r),
        "tinit": int(tinit),
        "tfinal": int(tfinal),
        "deltaT": int(delta_t),
        "beta1": beta1,
        "beta2": beta2,
        "orth_reg_weight": orth_reg_weight,
        "total_step": int(total_step),
        "rank_pattern": rank_pattern,
        "target_modules": target_modules,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "fan_in_fan_out": any(a.fan_in_fan_out for a in adapters.values()),
        "bias": "none",
        "init_lora_weights": True,
        "modules_to_save": modules_to_save or None,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / PEFT_CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")
    log.info("exported %d AdaLoRA layers (init_r=%d, %d kept triplets) to %s in PEFT format",
             len(adapters), init_r, kept_total, directory)
    return directory


_RANK_PATTERN_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_E(?:\.[^.]+)?$")


def _pattern_module_path(key: str) -> str:
    match = _RANK_PATTERN_KEY.match(key)
    return match.group("path") if match else key


def import_peft(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load a PEFT AdaLoRA adapter folder (``save_pretrained`` output) into ``model``, a fresh base model.

    Every adapted layer becomes our :class:`SVDLinear` at ``init_r`` (so ``ranknum = init_r``, as in PEFT);
    the stored triplets go to the positions the rank pattern keeps, the pruned rows of A, E and B are zero
    and ``rank_mask`` is the pattern. ``modules_to_save`` tensors are copied into the model and made
    trainable. The adapter layers are found from the tensor names, so regex ``target_modules`` work too.
    As in PEFT (``autocast_adapter_dtype=True``), adapters of a float16 / bfloat16 base are float32.

    Returns:
        ``model``, modified in place.

    Raises:
        FileNotFoundError: the folder or its ``adapter_config.json`` / ``adapter_model.safetensors`` is missing.
        ValueError: another ``peft_type``, only pickled weights (``adapter_model.bin``: never unpickled), an
            unreadable file, a module the model lacks, a shape mismatch (the message names the tensor and both
            shapes), a rank pattern of the wrong length, or a model that already has adapters. The model is
            not changed then.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: PEFT adapter folder not found")
    config_path, weights_path = directory / PEFT_CONFIG_NAME, directory / PEFT_WEIGHTS_NAME
    config = _read_json(config_path)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "ADALORA":
        raise ValueError(f"{config_path}: peft_type is {config.get('peft_type')!r}, import_peft reads ADALORA")
    _refuse_pickles(directory, weights_path, "import_peft")
    init_r = int(_require(config, "init_r", config_path))
    lora_alpha = _require(config, "lora_alpha", config_path)
    if lora_alpha <= 0:  # PEFT's rule: scaling = lora_alpha if lora_alpha > 0 else r
        lora_alpha = float(init_r)
    lora_dropout = float(config.get("lora_dropout", 0.0))
    if config.get("bias", "none") != "none":
        log.warning("%s: bias=%r; trained biases are loaded as ordinary tensors", config_path, config["bias"])
    patterns = {_pattern_module_path(k): [bool(x) for x in v] for k, v in (config.get("rank_pattern") or {}).items()}
    if find_adapters(model):
        raise ValueError(f"{type(model).__name__} already has adapters; import_peft expects a fresh base model")
    raw = _read_safetensors(weights_path)

    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in raw.items()}
    adapter_parts: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        path, _, name = key.rpartition(".")
        if name in ("lora_A", "lora_E", "lora_B"):
            adapter_parts.setdefault(path, {})[name] = value
        elif name == "ranknum":
            continue  # PEFT never writes it; tolerate older files that did
        else:
            others[key] = value
    if not adapter_parts:
        raise ValueError(f"{weights_path}: no lora_A / lora_E / lora_B tensors found")
    stray = [p for p in patterns if p not in adapter_parts]
    if stray:
        raise ValueError(f"{config_path}: rank_pattern names modules without adapter tensors: {stray[:3]}")

    # ---- validate
    bases: dict[str, nn.Module] = {}
    keeps: dict[str, torch.Tensor] = {}
    for path, parts in adapter_parts.items():
        missing = [n for n in ("lora_A", "lora_E", "lora_B") if n not in parts]
        if missing:
            raise ValueError(f"{weights_path}: module {path!r} lacks {missing}")
        base = bases[path] = _base_linear(model, path, weights_path)
        in_features, out_features, _ = linear_shape(base)
        pattern = patterns.get(path, [True] * init_r)
        if len(pattern) != init_r:
            raise ValueError(f"{config_path}: rank_pattern of {path!r} has {len(pattern)} entries, init_r is {init_r}")
        keep = torch.tensor(pattern, dtype=torch.bool)
        rows = parts["lora_E"].shape[0] if parts["lora_E"].dim() else -1
        stored = int(keep.sum()) if rows != init_r else init_r  # PEFT stores all init_r rows when nothing is cut
        what = f"{path} is {type(base).__name__} in={in_features}, out={out_features}, {stored} stored triplets"
        _check_shape(weights_path, f"{PEFT_PREFIX}{path}.lora_A", parts["lora_A"], (stored, in_features), what)
        _check_shape(weights_path, f"{PEFT_PREFIX}{path}.lora_E", parts["lora_E"], (stored, 1), what)
        _check_shape(weights_path, f"{PEFT_PREFIX}{path}.lora_B", parts["lora_B"], (out_features, stored), what)
        keeps[path] = keep
    base_state = model.state_dict()
    for key, value in others.items():
        base_key = _base_key(key, adapter_parts)  # PEFT names a trained bias of an adapted layer <path>.base_layer.bias
        if base_key not in base_state:
            raise ValueError(f"{weights_path}: tensor {PEFT_PREFIX + key!r} does not exist in {type(model).__name__}")
        _check_shape(weights_path, PEFT_PREFIX + key, value, tuple(base_state[base_key].shape))

    # ---- build and load
    model.requires_grad_(False)
    with torch.no_grad():
        for path, parts in adapter_parts.items():
            # As PEFT loads it (autocast_adapter_dtype=True, its default): float32 adapters on a half base.
            adapter = SVDLinear(bases[path], r=init_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                autocast_adapter_dtype=True)
            keep = keeps[path].to(adapter.rank_mask.device)
            if parts["lora_E"].shape[0] == init_r:
                a, e, b = parts["lora_A"], parts["lora_E"] * keep.view(-1, 1).to(parts["lora_E"]), parts["lora_B"]
            else:
                a = torch.zeros_like(adapter.lora_A, device="cpu")
                e = torch.zeros_like(adapter.lora_E, device="cpu")
                b = torch.zeros_like(adapter.lora_B, device="cpu")
                index = keeps[path].nonzero().view(-1)
                a[index] = parts["lora_A"].to(a.dtype)
                e[index] = parts["lora_E"].to(e.dtype)
                b[:, index] = parts["lora_B"].to(b.dtype)
            adapter.lora_A.copy_(a)
            adapter.lora_E.copy_(e)
            adapter.lora_B.copy_(b)
            adapter.rank_mask.copy_(keep)
            _replace_module(model, path, adapter)
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for key, value in others.items():
            target = _find_target(key, params, buffers, adapter_parts)
            target.copy_(value.to(target.dtype))
            if isinstance(target, nn.Parameter):
                target.requires_grad_(True)
    log.info("imported %d PEFT AdaLoRA layers (init_r=%d) and %d other tensors from %s",
             len(adapter_parts), init_r, len(others), directory)
    return model


# ====================================================================== merge
@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain base layer back in its place.

    The result has no adapter modules left: a plain model (for transformers models, ready for
    ``save_pretrained``) whose outputs equal the adapted model's within float rounding. The
    ``requires_grad`` flags of the base layers are left as they were (frozen after injection).

    Adapters in another dtype than their base weight (float32 adapters of a bfloat16 model) are added in
    the wider dtype and rounded once to the weight's: ``(W.float() + delta).to(W.dtype)``, as PEFT's
    ``merge_and_unload`` does. Already merged adapters are only unwrapped.

    Returns:
        ``model``, modified in place.
    """
    adapters = find_adapters(model)
    for path, adapter in adapters.items():  # check every adapter can merge before changing any weight
        try:
            adapter.delta_weight()
        except NotImplementedError as err:
            raise ValueError(f"adapter {path!r} ({type(adapter).__name__}) has no weight delta to merge") from err
    # Deepest paths first, so that replacing a module never invalidates a path still to come.
    for path in sorted(adapters, key=lambda p: p.count("."), reverse=True):
        adapter = adapters[path]
        if not adapter.merged:
            _fold_delta(adapter)
        _replace_module(model, path, adapter.base_layer)
    log.info("merged %d adapters into %s", len(adapters), type(model).__name__)
    return model


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


def count_adapter_parameters(model: nn.Module) -> int:
    """Number of elements in the adapter parameters of ``model`` (A, E, B; not the wrapped base layers)."""
    total = 0
    for adapter in find_adapters(model).values():
        total += sum(p.numel() for n, p in adapter.named_parameters() if not n.startswith("base_layer."))
    return total


__all__ = [
    "check_pruned_triplets",
    "compact_adapters",
    "count_adapter_parameters",
    "export_peft",
    "head_tensor_names",
    "import_peft",
    "infer_peft_task_type",
    "load_adapter",
    "merge_adapters",
    "save_adapter",
]
