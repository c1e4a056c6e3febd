"""File and module helpers shared by the adapter and PEFT formats (safetensors only, nothing unpickled)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from adalora_pl.injection import find_adapters, is_linear

log = logging.getLogger(__name__)


def adapter_state(adapter: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's own tensors (parameters and buffers), without its wrapped ``base_layer``."""
    return {k: v for k, v in adapter.state_dict().items() if not k.startswith("base_layer.")}


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses shared or non-contiguous storage: give every tensor its own contiguous CPU copy.
    return t.detach().to("cpu").contiguous().clone()


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on CPU; a ValueError naming the file when it cannot be parsed."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError (an Exception subclass)
        raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from err


def require_key(config: Mapping, key: str, path: Path) -> Any:
    if key not in config:
        raise ValueError(f"{path}: missing field {key!r}")
    return config[key]


def base_linear(model: nn.Module, module_path: str, source: Path) -> nn.Module:
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


def check_shape(source: Path, key: str, found: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(found.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(
            f"{source}: tensor {key!r} has shape {tuple(found.shape)} but the base model needs "
            f"{tuple(expected)}{extra}"
        )


def replace_module(model: nn.Module, module_path: str, new: nn.Module) -> None:
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
        adapter_keys = {f"{path}.{k}" for path, a in find_adapters(model).items() for k in adapter_state(a)}
        return [n for n, p in model.named_parameters() if p.requires_grad and n not in adapter_keys]
    names: list[str] = []
    for module_name in head_modules:
        try:
            module = model.get_submodule(module_name)
        except AttributeError as err:
            raise ValueError(f"head module {module_name!r} does not exist in {type(model).__name__}") from err
        names.extend(f"{module_name}.{k}" for k in module.state_dict())
    return list(dict.fromkeys(names))


def json_safe(value: Any) -> Any:
    """``value`` converted to something ``json.dumps`` writes (tuples to lists, paths and others to str)."""
    return json.loads(json.dumps(value, default=str))


@torch.no_grad()
def cast_adapter_tensor(adapter: nn.Module, name: str, dtype: torch.dtype) -> None:
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


def refuse_pickles(directory: Path, weights_path: Path, reader: str) -> None:
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


def dropout_p(adapter: nn.Module) -> float:
    dropout = adapter.lora_dropout
    return float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0


def find_target(key: str, params: Mapping, buffers: Mapping, adapter_paths: Iterable[str]) -> torch.Tensor | None:
    """The parameter or buffer of the adapted model that ``key`` names; a key given relative to the base
    model (``<adapter path>.bias``) is also found under ``<adapter path>.base_layer.bias``."""
    for candidate in (key, *(f"{p}.base_layer.{key[len(p) + 1:]}" for p in adapter_paths if key.startswith(p + "."))):
        if candidate in params:
            return params[candidate]
        if candidate in buffers:
            return buffers[candidate]
    return None


def base_state_key(key: str, adapter_paths: Iterable[str]) -> str:
    """The key a base model (no adapters) has for ``key`` (``<adapter>.base_layer.x`` -> ``<adapter>.x``)."""
    for path in adapter_paths:
        prefix = path + ".base_layer."
        if key.startswith(prefix):
            return f"{path}.{key[len(prefix):]}"
    return key


def owner_modules(tensor_names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(name.rpartition(".")[0] for name in tensor_names))
