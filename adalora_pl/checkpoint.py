"""From a Lightning checkpoint of a task module to a shippable artifact (``python cli.py export``)."""

from __future__ import annotations

import importlib
import logging
import pickle
from pathlib import Path
from typing import Any, Literal

import torch

from adalora_pl.export import export_peft, merge_adapters, save_adapter
from adalora_pl.injection import find_adapters

log = logging.getLogger(__name__)

MODULE_CLASS_KEY = "adalora_pl_module_class"
EXPORT_FORMATS = ("adapter", "peft", "merged")


def read_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint without unpickling arbitrary objects (``weights_only=True``)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ValueError(f"{path} is not a readable Lightning checkpoint (or holds non-tensor objects): {err}") from err


def load_task_module(ckpt_path: str | Path):
    """Rebuild the task module a checkpoint was saved from (backbone from its saved hyperparameters)."""
    ckpt = read_checkpoint(ckpt_path)
    hparams = ckpt.get("hyper_parameters")
    # Our key, or the one LightningCLI stores in subclass mode (checkpoints written before the key existed).
    class_path = ckpt.get(MODULE_CLASS_KEY) or (hparams or {}).get("_class_path")
    if hparams is not None:  # LightningCLI adds private keys such as "_class_path" and "_instantiator"
        hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
    if class_path is None or hparams is None or "state_dict" not in ckpt:
        raise ValueError(
            f"{ckpt_path} was not written by an adalora_pl task module (missing {MODULE_CLASS_KEY!r}, "
            "'hyper_parameters' or 'state_dict'); export works on checkpoints of `python cli.py fit`"
        )
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    module = cls(**hparams)
    state, own = ckpt["state_dict"], module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
                  if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{ckpt_path} does not match the backbone {hparams.get('backbone')!r}: {len(mismatched)} tensors of "
            f"another shape (checkpoint vs model, e.g. {mismatched[:2]}), {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    module.load_state_dict(state)
    return module, ckpt


def export_checkpoint(ckpt_path: str | Path, fmt: Literal["adapter", "peft", "merged"], output: str | Path) -> Path:
    """Write the adapters of a fit checkpoint as ``adapter`` (safetensors + JSON), ``peft`` (a folder
    ``PeftModel.from_pretrained`` loads) or ``merged`` (a plain transformers model, adapters folded in)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {list(EXPORT_FORMATS)}, got {fmt!r}")
    module, ckpt = load_task_module(ckpt_path)
    model, h = module.model, dict(ckpt["hyper_parameters"])
    if not find_adapters(model) and fmt != "merged":
        raise ValueError(f"{ckpt_path} has no adapters (method={h.get('method')!r}); use --format merged")
    output = Path(output)
    if fmt == "adapter":
        save_adapter(model, output, config={**h, "backbone": h.get("backbone")})
    elif fmt == "peft":
        allocator = (ckpt.get("callbacks") or {})
        schedule = next((s["schedule"] for s in allocator.values() if isinstance(s, dict) and "schedule" in s), None)
        if schedule is None:
            raise ValueError(f"{ckpt_path} has no AdaLoRA schedule state; PEFT export needs an AdaLoRA run")
        export_peft(model, output, base_model_name_or_path=h.get("backbone"), total_step=schedule["total_step"],
                    tinit=schedule["tinit"], tfinal=schedule["tfinal"], target_r=h.get("target_r"),
                    delta_t=schedule["delta_t"], orth_reg_weight=h.get("orth_reg_weight", 0.1))
    else:
        merged = merge_adapters(model)
        merged.save_pretrained(output)
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(h["backbone"]).save_pretrained(output)
        except (OSError, ValueError) as err:  # no tokenizer next to a local backbone: the weights still count
            log.warning("could not copy the tokenizer of %s: %s", h.get("backbone"), err)
    size = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    log.info("exported %s as %s to %s (%.1f MB)", ckpt_path, fmt, output, size / 1e6)
    print(f"exported {fmt} to {output} ({size / 1e6:.2f} MB)")
    return output
