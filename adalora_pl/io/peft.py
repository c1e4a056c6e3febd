"""PEFT's AdaLoRA folder format: :func:`export_peft` / :func:`import_peft` (docs/method.md §8).

``peft.PeftModel.from_pretrained(base, folder)`` on an exported folder gives the same outputs as our model, and
``import_peft`` reads such a folder back. As read from peft 0.21 and checked by the tests:

- ``adapter_model.safetensors`` keys: ``base_model.model.<module path>.lora_A`` / ``.lora_E`` / ``.lora_B``
  (no adapter name, no ``.weight``, no ranknum). With a rank pattern only the kept triplets are stored, so
  ``export_peft`` refuses a pruned triplet whose ``lora_E`` is not zero (see :mod:`adalora_pl.io.surgery`).
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
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from adalora_pl.config import AdaLoRAConfig
from adalora_pl.errors import ConfigError
from adalora_pl.injection import find_adapters
from adalora_pl.io._common import (
    base_linear,
    base_state_key,
    check_shape,
    cpu_copy,
    dropout_p,
    find_target,
    head_tensor_names,
    owner_modules,
    read_json,
    read_safetensors,
    refuse_pickles,
    replace_module,
    require_key,
)
from adalora_pl.io.surgery import check_pruned_triplets
from adalora_pl.layers import INITIAL_TENSORS, RANKNUM_EPS, SVDLinear, linear_shape
from adalora_pl.quantized import check_adaptable, keep_model_exact

log = logging.getLogger(__name__)


PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


PEFT_CONFIG_NAME = "adapter_config.json"


PEFT_PREFIX = "base_model.model."


# Module names PEFT adds to modules_to_save by itself for these task types (peft_model.py).
PEFT_IMPLICIT_MODULES_TO_SAVE = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}


# ====================================================================== PEFT format
def write_peft_folder(directory: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write a PEFT adapter folder: ``adapter_model.safetensors`` (``tensors``) and ``adapter_config.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory


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


def peft_modules_to_save(
    model: nn.Module,
    adapters: Iterable[str],
    task_type: str | None,
    head_modules: Iterable[str] | None = None,
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """PEFT's ``modules_to_save`` entries for ``model`` and the head tensors a PEFT folder stores for them.

    The entries are ``head_modules`` or, by default, the modules owning the trainable parameters that are not
    adapter tensors. The tensors cover every module PEFT will wrap on load: those the entries match by its
    suffix rule plus the ones its ``task_type`` adds (:data:`PEFT_IMPLICIT_MODULES_TO_SAVE`), keyed
    ``base_model.model.<module path>.<state key>``.

    Args:
        model: the model being exported.
        adapters: the module paths of its adapters (a wrapped module must not overlap one).
        task_type: PEFT's task type of the export.
        head_modules: explicit ``modules_to_save`` entries; None infers them from the trainable parameters.

    Raises:
        ValueError: a trainable parameter on the root module, or a module PEFT would wrap that overlaps an
            adapter.
    """
    adapters = list(adapters)
    heads = head_tensor_names(model, head_modules)
    modules_to_save = list(head_modules) if head_modules is not None else owner_modules(heads)
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
    tensors = {
        f"{PEFT_PREFIX}{name}.{key}": cpu_copy(value)
        for name in wrapped
        for key, value in model.get_submodule(name).state_dict().items()
    }
    return modules_to_save, tensors


def peft_target_modules(model: nn.Module, paths: Iterable[str]) -> list[str] | str:
    """PEFT's ``target_modules`` naming exactly the modules at ``paths``.

    PEFT matches a list entry to a module whose name equals it or ends with ``"." + entry``, so the plain
    paths are returned unless one of them is also such a suffix of another module's name; then one anchored
    regex (which PEFT full-matches) is returned instead.
    """
    paths = list(paths)
    names = [n for n, _ in model.named_modules()]
    if any(n != p and n.endswith("." + p) for p in paths for n in names):
        return "^(?:" + "|".join(re.escape(p) for p in paths) + ")$"
    return paths


def export_peft(
    model: nn.Module,
    directory: str | Path,
    *,
    config: AdaLoRAConfig | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    head_modules: Iterable[str] | None = None,
    zero_masked: bool = False,
) -> Path:
    """Write ``model``'s AdaLoRA adapters as a PEFT adapter folder (``adapter_config.json`` +
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base, directory)`` loads.

    The rank pattern is each layer's ``rank_mask`` (padded with False to ``init_r`` for a compacted layer);
    only the kept triplets are written, as PEFT does. All layers must share ``ranknum`` (PEFT's ``init_r``,
    which fixes the scaling), ``lora_alpha``, ``lora_dropout`` and the scaling rule.

    The opt-in options are written in PEFT's terms, so that PEFT's model gives ours' outputs up to float rounding
    (docs/method.md §13): rsLoRA scaling (which PEFT's AdaLoRA lacks) by the ``lora_alpha`` whose PEFT scale
    ``lora_alpha / (init_r + 1e-5)`` equals ours; a weight-SVD start by appending each layer's initial triplets
    with negated ``lora_E`` (``init_r`` in the folder is then twice ours), since PEFT loads onto the pretrained
    weight W, not onto our residual.

    Args:
        model: a model with :class:`SVDLinear` adapters.
        directory: output folder (created).
        base_model_name_or_path: recorded for ``PeftModel.from_pretrained`` users and model cards.
        task_type: PEFT task type (``"SEQ_CLS"``, ...); None infers it from the model class name. It matters:
            it selects PEFT's model class, and SEQ_CLS / TOKEN_CLS / QUESTION_ANS add head names to
            ``modules_to_save`` (whose tensors are then written as well).
        config: the run's settings (:class:`~adalora_pl.config.AdaLoRAConfig`), for the schedule fields of PEFT's
            config (``target_r``, ``tinit``, ``tfinal``, ``deltaT``, ``beta1``, ``beta2``, ``orth_reg_weight``,
            ``total_step``); they only matter to whoever continues training with PEFT. Its ``init_r``,
            ``lora_alpha`` and ``lora_dropout`` must be the adapters'. A fraction ``tinit``/``tfinal`` needs its
            ``total_step``. None: no schedule (``tinit = tfinal = 0``, ``total_step = 1``) and ``target_r`` the mean
            kept rank.
        head_modules: module names saved under ``modules_to_save``; by default the modules owning the
            trainable parameters that are not adapter tensors.
        zero_masked: a pruned triplet (``rank_mask`` False) with a nonzero ``lora_E`` is an error by default,
            because leaving it out of the folder would change the outputs; True zeroes such triplets in
            ``model`` (in place) first, so that the model and the export agree.

    Tensors keep their dtype (float32 adapters of a bfloat16 base stay float32, as PEFT keeps them). On a quantized
    base the files are the same as on its unquantized model: PEFT loads them onto the base quantized the same way
    (its ``SVDLinear4bit`` / ``SVDLinear8bitLt`` for a transformers bitsandbytes model; docs/method.md §11).

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
    dropouts = {dropout_p(a) for a in adapters.values()}
    if len(alphas) > 1 or len(dropouts) > 1:
        raise ValueError(f"PEFT needs one lora_alpha and one lora_dropout; found {sorted(alphas)}, {sorted(dropouts)}")
    lora_alpha, lora_dropout = alphas.pop(), dropouts.pop()
    if lora_alpha <= 0:
        raise ValueError(f"PEFT replaces lora_alpha <= 0 by init_r; cannot export lora_alpha={lora_alpha}")
    rules = {a.scaling_rule for a in adapters.values()}
    if len(rules) > 1:
        raise ValueError(f"PEFT's AdaLoraConfig has one scaling; the adapters mix the scaling rules {sorted(rules)}")
    schedule = _peft_schedule(config, init_r, lora_alpha, lora_dropout)
    # PEFT's AdaLoRA scales by lora_alpha / (init_r + 1e-5) and has no rsLoRA, nor a weight-SVD start. Both are
    # written exactly in its terms (docs/method.md §13): a weight-SVD layer's initial triplets are appended with
    # negated singular values, so that the folder's update is the change relative to the ORIGINAL weight W (PEFT
    # loads onto the pretrained base, not our residual), and init_r grows by their number; the alpha written is the
    # one whose PEFT scale equals ours. Default adapters are written as they always were.
    initial = init_r if any(a.adapter_init == "weight_svd" for a in adapters.values()) else 0
    peft_init_r = init_r + initial
    peft_alpha = lora_alpha
    if rules != {"alpha_over_r"} or initial:
        scale = next(iter(adapters.values())).scale()  # float64; the same for every layer (one ranknum, alpha, rule)
        peft_alpha = float(scale * (peft_init_r + RANKNUM_EPS))
    if task_type is None:
        task_type = infer_peft_task_type(model)
    merged = [p for p, a in adapters.items() if a.merged]
    if merged:
        raise ValueError(f"adapter {merged[0]!r} is merged into its base weight; unmerge it before export_peft")

    modules_to_save, head_tensors = peft_modules_to_save(model, adapters, task_type, head_modules)
    # Last check, as with zero_masked=True it changes the model.
    check_pruned_triplets(adapters, "export_peft", zero_masked=zero_masked)

    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, list[bool]] = {}
    kept_total = 0
    for path, adapter in adapters.items():
        keep = adapter.rank_mask.nonzero().view(-1)
        kept_total += keep.numel()
        pattern = adapter.rank_mask.tolist() + [False] * (init_r - adapter.r)
        a, e, b = adapter.lora_A[keep], adapter.lora_E[keep], adapter.lora_B[:, keep]
        if initial:
            if adapter.adapter_init == "weight_svd":
                a0, e0, b0 = (getattr(adapter, name) for name in INITIAL_TENSORS)
                a, e, b = torch.cat([a, a0]), torch.cat([e, -e0]), torch.cat([b, b0], dim=1)
                pattern += [True] * initial
            else:  # a plain layer next to weight-SVD ones: its update is relative to W already
                pattern += [False] * initial
        rank_pattern[f"{path}.lora_E"] = pattern
        prefix = f"{PEFT_PREFIX}{path}"
        tensors[f"{prefix}.lora_A"] = cpu_copy(a)
        tensors[f"{prefix}.lora_E"] = cpu_copy(e)
        tensors[f"{prefix}.lora_B"] = cpu_copy(b)
    if schedule["target_r"] is None:
        schedule["target_r"] = round(kept_total / len(adapters))
    tensors.update(head_tensors)
    target_modules = peft_target_modules(model, adapters)

    peft_config = {
        "peft_type": "ADALORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "init_r": peft_init_r,
        **schedule,
        "rank_pattern": rank_pattern,
        "target_modules": target_modules,
        "lora_alpha": peft_alpha,
        "lora_dropout": lora_dropout,
        "fan_in_fan_out": any(a.fan_in_fan_out for a in adapters.values()),
        "bias": "none",
        "init_lora_weights": True,
        "modules_to_save": modules_to_save or None,
    }
    directory = write_peft_folder(directory, tensors, peft_config)
    log.info("exported %d AdaLoRA layers (init_r=%d, %d kept triplets) to %s in PEFT format",
             len(adapters), init_r, kept_total, directory)
    return directory


def _peft_schedule(config: AdaLoRAConfig | None, init_r: int, lora_alpha: float, lora_dropout: float) -> dict:
    """The schedule fields of PEFT's AdaLoraConfig for adapters of ``init_r`` / ``lora_alpha`` / ``lora_dropout``."""
    if config is None:
        return {"target_r": None, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85,
                "orth_reg_weight": 0.1, "total_step": 1}
    found = {"init_r": init_r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout}
    differ = [f"{k}={getattr(config, k)!r} (adapters: {v!r})" for k, v in found.items() if getattr(config, k) != v]
    if differ:
        raise ConfigError(f"the config does not describe these adapters: {', '.join(differ)}")
    total = config.total_step
    if total is None:
        if not all(isinstance(v, int) for v in (config.tinit, config.tfinal)):
            raise ConfigError("tinit/tfinal are fractions of training: the config needs total_step to export them")
        total = config.tinit + config.tfinal + 1
    resolved = config.resolved(total)
    gap = resolved.schedule_gap()
    if gap is not None:
        raise ConfigError(f"PEFT's AdaLoraConfig needs total_step > tinit + tfinal: {gap}")
    fields = resolved.to_peft()
    return {k: fields[k] for k in ("target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                                   "total_step")}


_LORA_E_SUFFIX = re.compile(r"\.lora_E(?:\.[^.]+)?$")


def rank_pattern_module_path(key: str) -> str:
    """The module path a rank-pattern key names: ours (the path itself) or PEFT's
    ``[base_model.model.]<path>.lora_E[.<adapter name>]``."""
    return _LORA_E_SUFFIX.sub("", key.removeprefix(PEFT_PREFIX))


def import_peft(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load a PEFT AdaLoRA adapter folder (``save_pretrained`` output) into ``model``, a fresh base model.

    Every adapted layer becomes our :class:`SVDLinear` at ``init_r`` (so ``ranknum = init_r``, as in PEFT);
    the stored triplets go to the positions the rank pattern keeps, the pruned rows of A, E and B are zero
    and ``rank_mask`` is the pattern. ``modules_to_save`` tensors are copied into the model and made
    trainable. The adapter layers are found from the tensor names, so regex ``target_modules`` work too.
    As in PEFT (``autocast_adapter_dtype=True``), adapters of a float16 / bfloat16 base are float32; so are those
    of a quantized base (bitsandbytes 4-bit / int8, torchao int8), which keeps running quantized, as in training.

    Returns:
        ``model``, modified in place.

    Raises:
        FileNotFoundError: the folder or its ``adapter_config.json`` / ``adapter_model.safetensors`` is missing.
        ValueError: another ``peft_type``, only pickled weights (``adapter_model.bin``: never unpickled), an
            unreadable file, a module the model lacks, a shape mismatch (the message names the tensor and both
            shapes), a rank pattern of the wrong length, a quantized layer adapters cannot wrap (named with its
            type), or a model that already has adapters. The model is not changed then.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: PEFT adapter folder not found")
    config_path, weights_path = directory / PEFT_CONFIG_NAME, directory / PEFT_WEIGHTS_NAME
    config = read_json(config_path)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "ADALORA":
        raise ValueError(f"{config_path}: peft_type is {config.get('peft_type')!r}, import_peft reads ADALORA")
    refuse_pickles(directory, weights_path, "import_peft")
    init_r = int(require_key(config, "init_r", config_path))
    lora_alpha = require_key(config, "lora_alpha", config_path)
    if lora_alpha <= 0:  # PEFT's rule: scaling = lora_alpha if lora_alpha > 0 else r
        lora_alpha = float(init_r)
    lora_dropout = float(config.get("lora_dropout", 0.0))
    if config.get("bias", "none") != "none":
        log.warning("%s: bias=%r; trained biases are loaded as ordinary tensors", config_path, config["bias"])
    patterns = {
        rank_pattern_module_path(k): [bool(x) for x in v] for k, v in (config.get("rank_pattern") or {}).items()
    }
    if find_adapters(model):
        raise ValueError(f"{type(model).__name__} already has adapters; import_peft expects a fresh base model")
    raw = read_safetensors(weights_path)

    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in raw.items()}
    adapter_parts: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        path, _, name = key.rpartition(".")
        if name in ("lora_A", "lora_E", "lora_B"):
            adapter_parts.setdefault(path, {})[name] = value
        else:
            others[key] = value
    if not adapter_parts:
        raise ValueError(f"{weights_path}: no lora_A / lora_E / lora_B tensors found")
    stray = [p for p in patterns if p not in adapter_parts]
    if stray:
        raise ValueError(f"{config_path}: rank_pattern names modules without adapter tensors: {stray[:3]}")

    keep_model_exact(model)  # bitsandbytes' CPU repacking of 4-bit layers would cut the adapters' gradients
    # ---- validate
    bases: dict[str, nn.Module] = {}
    keeps: dict[str, torch.Tensor] = {}
    for path, parts in adapter_parts.items():
        missing = [n for n in ("lora_A", "lora_E", "lora_B") if n not in parts]
        if missing:
            raise ValueError(f"{weights_path}: module {path!r} lacks {missing}")
        base = bases[path] = base_linear(model, path, weights_path)
        check_adaptable(base, path)  # a quantized layer adapters cannot wrap: refused here, before any change
        in_features, out_features, _ = linear_shape(base)
        pattern = patterns.get(path, [True] * init_r)
        if len(pattern) != init_r:
            raise ValueError(f"{config_path}: rank_pattern of {path!r} has {len(pattern)} entries, init_r is {init_r}")
        keep = torch.tensor(pattern, dtype=torch.bool)
        rows = parts["lora_E"].shape[0] if parts["lora_E"].dim() else -1
        stored = int(keep.sum()) if rows != init_r else init_r  # PEFT stores all init_r rows when nothing is cut
        what = f"{path} is {type(base).__name__} in={in_features}, out={out_features}, {stored} stored triplets"
        check_shape(weights_path, f"{PEFT_PREFIX}{path}.lora_A", parts["lora_A"], (stored, in_features), what)
        check_shape(weights_path, f"{PEFT_PREFIX}{path}.lora_E", parts["lora_E"], (stored, 1), what)
        check_shape(weights_path, f"{PEFT_PREFIX}{path}.lora_B", parts["lora_B"], (out_features, stored), what)
        keeps[path] = keep
    base_state = model.state_dict()
    for key, value in others.items():
        # PEFT names a trained bias of an adapted layer <path>.base_layer.bias
        base_key = base_state_key(key, adapter_parts)
        if base_key not in base_state:
            raise ValueError(f"{weights_path}: tensor {PEFT_PREFIX + key!r} does not exist in {type(model).__name__}")
        check_shape(weights_path, PEFT_PREFIX + key, value, tuple(base_state[base_key].shape))

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
            replace_module(model, path, adapter)
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        for key, value in others.items():
            target = find_target(key, params, buffers, adapter_parts)
            target.copy_(value.to(target.dtype))
            if isinstance(target, nn.Parameter):
                target.requires_grad_(True)
    log.info("imported %d PEFT AdaLoRA layers (init_r=%d) and %d other tensors from %s",
             len(adapter_parts), init_r, len(others), directory)
    return model
