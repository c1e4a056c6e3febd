"""Put adapters into a model: find target linears by name suffix, replace them, freeze the rest."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from adalora_pl.errors import ConfigError
from adalora_pl.layers import AdapterLayer, LoRALinear, SVDLinear
from adalora_pl.quantized import check_adaptable, keep_model_exact

log = logging.getLogger(__name__)

# The method's own adapter layers by name; baselines pass their layer class to inject_adapters instead
# (adalora_pl.baselines.ADAPTER_CLASSES is the table of all of them).
CORE_ADAPTER_CLASSES: dict[str, type[AdapterLayer]] = {"adalora": SVDLinear, "lora": LoRALinear}


# One entry of a preset: a name suffix, or a tuple of alternative suffixes that fill the same role in
# different members of a model family (at least one of them must exist; see :func:`preset_targets`).
PresetEntry = str | tuple[str, ...]

# Linear layers adapted per transformer block, by model_type. Encoders: the paper's six matrices per layer
# (query, key, value, attention output, FFN in, FFN out; docs/method.md §7). Suffixes match whole name components.
# Names are qualified where a bare name would also match a task head (BART's ``out_proj`` is also
# ``classification_head.out_proj``), so that ``preset_targets(model)`` can be passed on as explicit targets.
TARGET_MODULE_PRESETS: dict[str, list[PresetEntry]] = {
    "deberta-v2": [
        "query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense",
    ],
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "mpnet": ["attn.q", "attn.k", "attn.v", "attn.o", "intermediate.dense", "output.dense"],
    "bart": ["q_proj", "k_proj", "v_proj", "self_attn.out_proj", "encoder_attn.out_proj", "fc1", "fc2"],
    # T5 v1.0 has one FFN input ``wi``; T5 v1.1 / flan-t5 (gated FFN) have ``wi_0`` and ``wi_1`` instead.
    "t5": ["q", "k", "v", "o", ("wi", "wi_0", "wi_1"), "wo"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    # Phi-3 fuses q/k/v into one ``qkv_proj`` and gate/up into one ``gate_up_proj``: each gets one adapter.
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
}

# Task heads trained in full next to the adapters, as the authors do (docs/method.md §7: classifier and pooler). They
# cover the heads of the auto classes: ``classifier`` (BERT/RoBERTa/DeBERTa/MPNet sequence and token
# classification; a module with ``dense`` and ``out_proj`` in RoBERTa and MPNet), ``pooler`` (BERT, DeBERTa),
# ``classification_head`` (BART, T5), ``qa_outputs`` (question answering), ``score`` (Llama, Mistral, Qwen2, Gemma,
# Gemma 2, Phi-3, GPT-2). A language model's ``lm_head`` is left out: many models (Gemma, Gemma 2) tie it to the
# input embeddings, and a causal LM is tuned through its blocks only.
DEFAULT_TRAINABLE_MODULES = ["classifier", "pooler", "classification_head", "qa_outputs", "score"]


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` (also its quantized subclasses: bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``, or a
    torchao-quantized weight) and GPT-2's ``Conv1D``. Whether a quantized one can be adapted is decided by type,
    by :func:`adalora_pl.quantized.check_adaptable`."""
    return isinstance(module, (nn.Linear, Conv1D))


def check_adaptable_path(model: nn.Module, path: str) -> None:
    """Refuse the module at ``path`` of ``model`` if it is quantized in a way adapters cannot wrap (the message names
    its type); a missing path is left to the caller's own message."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return
    check_adaptable(module, path)


def name_matches(name: str, suffix: str) -> bool:
    """True when ``suffix`` equals ``name`` or its last dot-separated components."""
    return name == suffix or name.endswith("." + suffix)


def preset_targets(model: nn.Module, trainable_modules: Sequence[str] = DEFAULT_TRAINABLE_MODULES) -> list[str]:
    """The preset for ``model.config.model_type``, resolved against ``model``: the names it has.

    A plain preset entry is required; a tuple entry lists alternatives of which the model has at least one
    (T5's ``("wi", "wi_0", "wi_1")``) and keeps those it has. Modules inside ``trainable_modules`` are not
    looked at: they are trained in full, not adapted. The result is a list of suffixes that can be passed
    on as ``target_modules`` (to :func:`inject_adapters`, or to PEFT).

    Raises:
        ConfigError: no preset for the model type (or no config), or a required entry (or every alternative
            of a tuple entry) matches no module of ``model``; the message lists the linear layers it has.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in TARGET_MODULE_PRESETS:
        raise ConfigError(
            f"no preset of target modules for model_type {model_type!r}; pass target_modules explicitly. "
            f"Presets exist for: {sorted(TARGET_MODULE_PRESETS)}. "
            f"Linear layers of this model: {linear_layer_suffixes(model)}"
        )
    heads = trainable_module_names(model, trainable_modules)
    names = [n for n, _ in model.named_modules() if n and not inside_any(n, heads)]
    targets: list[str] = []
    missing: list[PresetEntry] = []
    for entry in TARGET_MODULE_PRESETS[model_type]:
        alternatives = (entry,) if isinstance(entry, str) else entry
        present = [t for t in alternatives if any(name_matches(n, t) for n in names)]
        if not present:
            missing.append(entry)
        targets.extend(present)
    if missing:
        raise ConfigError(
            f"the {model_type!r} preset entries {missing} match no module of {type(model).__name__} outside "
            f"the trainable modules {list(trainable_modules)}; pass target_modules explicitly. "
            f"Linear layers of this model: {linear_layer_suffixes(model)}"
        )
    return targets


def trainable_module_names(model: nn.Module, trainable_modules: Sequence[str]) -> list[str]:
    """Paths of the modules of ``model`` whose names end in one of ``trainable_modules``."""
    return [n for n, _ in model.named_modules() if n and any(name_matches(n, t) for t in trainable_modules)]


def inside_any(name: str, parents: Sequence[str]) -> str | None:
    """The first of ``parents`` that is ``name`` or contains it, else ``None``."""
    return next((p for p in parents if name == p or name.startswith(p + ".")), None)


def split_layer_path(path: str) -> tuple[str, int | None, str]:
    """``(stack prefix, layer index, module type)`` of a module path; the layer index is its last integer
    component (``encoder.layer.3.attention.self.query`` -> ``("encoder.layer", 3, "attention.self.query")``)."""
    parts = path.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    if not digits:
        return "", None, path
    i = digits[-1]
    return ".".join(parts[:i]), int(parts[i]), ".".join(parts[i + 1 :]) or parts[i]


def linear_layer_suffixes(model: nn.Module) -> list[str]:
    """Linear layer names with the block index stripped (``encoder.layer.0.attention.self.query`` ->
    ``attention.self.query``), to show in error messages which targets exist."""
    suffixes = set()
    for name, module in model.named_modules():
        if is_linear(module) or isinstance(module, AdapterLayer):
            suffixes.add(split_layer_path(name)[2])
    return sorted(suffixes)


def find_adapters(model: nn.Module) -> dict[str, AdapterLayer]:
    """All adapter layers in ``model``, by module path, in ``named_modules`` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def count_adapter_parameters(model: nn.Module, kept_only: bool = False) -> int:
    """Elements in the adapter parameters of ``model`` (not the wrapped base layers).

    ``kept_only=True`` counts as the paper's tables do (#Params): a kept AdaLoRA triplet costs in + out + 1, a
    kept prune-LoRA doublet in + out, pruned ones nothing (see :meth:`AdapterLayer.parameter_count`).
    """
    return sum(layer.parameter_count(kept_only) for layer in find_adapters(model).values())


def inject_adapters(
    model: nn.Module,
    target_modules: Sequence[str] | None = None,
    *,
    method: str | type[AdapterLayer] = "adalora",
    r: int = 12,
    lora_alpha: float = 32,
    lora_dropout: float = 0.0,
    trainable_modules: Sequence[str] = DEFAULT_TRAINABLE_MODULES,
    autocast_adapter_dtype: bool = True,
    ranks: Mapping[str, int] | None = None,
    **layer_options: Any,
) -> dict[str, AdapterLayer]:
    """Replace the target linear layers of ``model`` in place by adapters and freeze everything else.

    Args:
        model: any ``nn.Module`` (usually a transformers model).
        target_modules: name suffixes of the linear layers to adapt (``"query"`` matches
            ``encoder.layer.3.attention.self.query``); each must match at least one module. ``None`` takes
            the preset for ``model.config.model_type`` resolved against the model (see
            :func:`preset_targets`): alternatives the model lacks are dropped, and modules inside
            ``trainable_modules`` are left to be trained in full instead of adapted.
        method: ``"adalora"`` (:class:`SVDLinear`, ``r`` is init_r), ``"lora"`` (:class:`LoRALinear`), or a
            an :class:`AdapterLayer` subclass built as ``cls(base_layer, r, lora_alpha, lora_dropout,
            autocast_adapter_dtype)`` (the baselines' layers).
        r: initial rank for AdaLoRA, rank for LoRA.
        lora_alpha: adapter scaling numerator.
        lora_dropout: dropout on the adapter branch.
        trainable_modules: name suffixes of modules trained in full (task heads). A known head name
            (:data:`DEFAULT_TRAINABLE_MODULES`) may match nothing (a model without a pooler); any other name
            must match a module (see :func:`set_trainable_modules`), which is checked before the model changes.
        autocast_adapter_dtype: float32 adapters on a float16/bfloat16 model (default, as PEFT); False keeps
            the model's dtype.
        ranks: a rank per module path (e.g. a rank pattern an AdaLoRA run found, :func:`read_rank_pattern`) instead
            of one ``r``: the paths must be exactly those ``target_modules`` match; a path at rank 0 is not adapted
            (it keeps its plain base layer: rank 0 is no update).
        **layer_options: further keyword arguments of the adapter class (:class:`SVDLinear`: ``adapter_init``,
            ``scaling``; :class:`LoRALinear`: ``scaling``).

    Returns:
        The adapters by module path.

    Quantized targets (bitsandbytes ``Linear4bit`` nf4/fp4 and ``Linear8bitLt``, torchao int8 weight-only) are
    recognised by type and keep running quantized; the adapters are float32 (the base's compute dtype with
    ``autocast_adapter_dtype=False``). See docs/method.md §11.

    Raises:
        ConfigError: an explicit target matches nothing, or lies inside a trainable module; a target matches
            a layer that is not linear; the preset misses a required entry (see :func:`preset_targets`). The
            message lists the linear layers the model has.
        ConfigError: a target is quantized in a way adapters cannot wrap (HQQ, GPTQ, another torchao scheme, ...);
            the message names its type. Raised before the model changes.
        ConfigError: a trainable module name that is not a known head name matches nothing.
        ConfigError: ``ranks`` names a module the targets do not match, or misses one they match (both listed), or
            gives a rank that is not an integer >= 0.
    """
    if isinstance(method, type) and issubclass(method, AdapterLayer):
        layer_cls = method
    elif method in CORE_ADAPTER_CLASSES:
        layer_cls = CORE_ADAPTER_CLASSES[method]
    else:
        raise ConfigError(f"method must be one of {sorted(CORE_ADAPTER_CLASSES)} or an AdapterLayer class, "
                         f"got {method!r}")
    if find_adapters(model):
        raise ConfigError("model already has adapters; use find_adapters(model) to adopt them")
    check_trainable_modules(model, trainable_modules)  # before anything is replaced or frozen
    from_preset = target_modules is None
    targets = preset_targets(model, trainable_modules) if from_preset else list(target_modules)
    if not targets:
        raise ConfigError("target_modules is empty: name at least one linear layer to adapt")
    heads = trainable_module_names(model, trainable_modules)
    # A preset is a convenience: where one of its names also matches inside a head, the head wins. An
    # explicit target is what the user asked for, so an adapter it would put inside a head is an error.
    matched = match_targets(model, targets, skip=heads if from_preset else ())
    for name in matched:
        head = inside_any(name, heads)
        if head is not None:
            raise ConfigError(
                f"adapter target {name!r} lies inside trainable module {head!r}; "
                "narrow target_modules or trainable_modules"
            )

    if ranks is not None:
        check_ranks(ranks, matched)
    keep_model_exact(model)  # bitsandbytes' CPU repacking of 4-bit layers would cut the adapters' gradients
    model.requires_grad_(False)
    adapters = {}
    for name, module in matched.items():
        layer_r = r if ranks is None else ranks[name]
        if layer_r == 0:
            continue  # rank 0: no update, the plain base layer stays (frozen)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        adapter = layer_cls(module, r=layer_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                            autocast_adapter_dtype=autocast_adapter_dtype, **layer_options)
        setattr(parent, child, adapter)
        adapters[name] = adapter
    set_trainable_modules(model, trainable_modules)
    log.info("injected %d %s adapters (r=%s) into %s", len(adapters), method,
             r if ranks is None else "per module", type(model).__name__)
    return adapters


def check_ranks(ranks: Mapping[str, int], matched: Mapping[str, nn.Module]) -> None:
    """Refuse per-module ``ranks`` that do not name exactly the ``matched`` target paths, or a rank that is not an
    integer >= 0.

    Raises:
        ConfigError: listing the paths the ranks name but the targets lack, and those the targets match but the ranks
            lack.
    """
    extra = [p for p in ranks if p not in matched]
    missing = [p for p in matched if p not in ranks]
    if extra or missing:
        def listed(paths: list[str]) -> str:
            return f"{paths[:5]}{f' and {len(paths) - 5} more' if len(paths) > 5 else ''}"

        parts = ([f"{len(extra)} modules the model's targets lack: {listed(extra)}"] if extra else []) + (
            [f"no rank for {len(missing)} targeted modules: {listed(missing)}"] if missing else [])
        raise ConfigError(f"the rank pattern does not fit the model's target modules: {'; '.join(parts)}")
    bad = {p: k for p, k in ranks.items() if isinstance(k, bool) or not isinstance(k, int) or k < 0}
    if bad:
        raise ConfigError(f"ranks must be integers >= 0, got {dict(list(bad.items())[:5])}")


def adapter_param_groups(
    module: nn.Module, lr: float, lr_ratio_b: float = 1.0, lr_ratio_e: float = 1.0
) -> list[dict[str, Any]]:
    """Optimizer param groups for the trainable adapter parameters of ``module``, with per-factor learning rates.

    LoRA+-style (Hayou et al. 2024, arXiv 2402.12354): the B factors (``lora_B``) learn at ``lr * lr_ratio_b``,
    the singular values of SVD adapters (``lora_E``) at ``lr * lr_ratio_e``, everything else of the adapters (the A
    factors ``lora_A``, a bottleneck adapter's weights) at ``lr``. With both ratios 1 this is ONE group of all
    adapter parameters at ``lr``, the optimizer the reference builds. Groups are ``{"params": [...], "lr": ...}``
    in the order A, B, E (empty ones left out), parameters in ``module.parameters()`` order. Heads and other trained
    parameters are not included: add their own group.

    For :class:`~adalora_pl.AdaLoRACallback` users, whose optimizer is their own::

        def configure_optimizers(self):
            groups = adapter_param_groups(self, lr=5e-4, lr_ratio_b=4.0)
            return torch.optim.AdamW(groups + [{"params": self.head.parameters(), "lr": 1e-3}])

    (the callback injects the adapters in ``setup``, before ``configure_optimizers`` runs).

    Raises:
        ConfigError: ``lr`` or a ratio is not a finite number > 0; ``lr_ratio_e != 1`` on adapters without
            ``lora_E`` (LoRA); ``lr_ratio_b != 1`` on adapters without ``lora_B`` (bottleneck adapters); no adapters.
    """
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"lr must be a finite number > 0, got {lr!r}")
    for name, value in (("lr_ratio_b", lr_ratio_b), ("lr_ratio_e", lr_ratio_e)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{name} must be a finite number > 0 (1 keeps the learning_rate), got {value!r}")
    adapters = find_adapters(module)
    if not adapters:
        raise ConfigError(f"{type(module).__name__} has no adapters to group (inject them first)")
    factor: dict[int, str] = {}  # id(parameter) -> "A", "B" or "E"
    for layer in adapters.values():
        for name, p in layer.named_parameters():
            if not name.startswith("base_layer."):
                factor[id(p)] = {"lora_B": "B", "lora_E": "E"}.get(name.rpartition(".")[2], "A")
    params: dict[str, list[nn.Parameter]] = {"A": [], "B": [], "E": []}
    for p in module.parameters():
        if p.requires_grad and id(p) in factor:
            params[factor[id(p)]].append(p)
    for key, ratio, name, holder in (("E", lr_ratio_e, "lr_ratio_e", "lora_E (SVD adapters)"),
                                     ("B", lr_ratio_b, "lr_ratio_b", "lora_B (LoRA and SVD adapters)")):
        if ratio != 1 and not params[key]:
            kinds = sorted({type(a).__name__ for a in adapters.values()})
            raise ConfigError(f"{name}={ratio!r} scales the learning rate of {holder}, which the adapters {kinds} do "
                              f"not have; leave it at 1")
    if lr_ratio_b == 1 and lr_ratio_e == 1:
        # One group, as the reference's optimizer (PEFT parity, and resumes of checkpoints from before the option).
        return [{"params": [p for p in module.parameters() if p.requires_grad and id(p) in factor], "lr": lr}]
    rates = {"A": lr, "B": lr * lr_ratio_b, "E": lr * lr_ratio_e}
    return [{"params": params[key], "lr": rates[key]} for key in ("A", "B", "E") if params[key]]


def match_targets(model: nn.Module, targets: Sequence[str], skip: Sequence[str] = ()) -> dict[str, nn.Module]:
    """The linear layers of ``model`` that ``targets`` name, by path; modules inside ``skip`` are passed over.

    Raises:
        ConfigError: a target matches a module that is not linear, or a quantized one adapters cannot wrap (named
            with its type), or matches nothing (outside ``skip``).
    """
    matched: dict[str, nn.Module] = {}
    hits = dict.fromkeys(targets, 0)
    for name, module in model.named_modules():
        if inside_any(name, skip) is not None:
            continue
        for target in targets:
            if name_matches(name, target):
                hits[target] += 1
                check_adaptable(module, name)  # a quantized layer we cannot wrap: say so, with its type
                if not is_linear(module):
                    raise ConfigError(
                        f"target {target!r} matches {name!r}, a {type(module).__name__}, not a linear layer. "
                        f"Linear layers of this model: {linear_layer_suffixes(model)}"
                    )
                matched[name] = module
    missing = [t for t, n in hits.items() if n == 0]
    if missing:
        raise ConfigError(
            f"target_modules {missing} match no module of {type(model).__name__}. "
            f"Linear layers of this model: {linear_layer_suffixes(model)}"
        )
    return matched


def unmatched_trainable_modules(
    model: nn.Module, trainable_modules: Sequence[str], optional: Sequence[str] = DEFAULT_TRAINABLE_MODULES
) -> list[str]:
    """The entries of ``trainable_modules`` outside ``optional`` that match no module of ``model``."""
    names = [n for n, _ in model.named_modules() if n]
    return [t for t in trainable_modules if t not in optional and not any(name_matches(n, t) for n in names)]


def module_overview(model: nn.Module, depth: int = 2, limit: int = 24) -> list[str]:
    """Names of ``model``'s modules down to ``depth`` dot-separated components, skipping numbered blocks (at most
    ``limit``): what a name suffix could be, for error messages."""
    names = [n for n, _ in model.named_modules()
             if n and n.count(".") < depth and not any(part.isdigit() for part in n.split("."))]
    return names[:limit]


def check_trainable_modules(
    model: nn.Module, trainable_modules: Sequence[str], optional: Sequence[str] = DEFAULT_TRAINABLE_MODULES
) -> None:
    """Refuse trainable module names that match nothing, unless they are ``optional`` (see
    :func:`set_trainable_modules`).

    Raises:
        ConfigError: naming the unmatched names, the model class, its modules' names down to two levels and its
            linear layers.
    """
    unmatched = unmatched_trainable_modules(model, trainable_modules, optional)
    if unmatched:
        raise ConfigError(
            f"trainable_modules {unmatched} match no module of {type(model).__name__}; a name matches a module "
            f"whose path ends in it. Modules of this model: {module_overview(model)}; linear layers: "
            f"{linear_layer_suffixes(model)}. Known head names, which may be absent: {list(optional)}"
        )


def set_trainable_modules(
    model: nn.Module, trainable_modules: Sequence[str], optional: Sequence[str] = DEFAULT_TRAINABLE_MODULES
) -> list[str]:
    """Unfreeze the modules whose names end in one of ``trainable_modules``; returns their names.

    A name that matches nothing is almost always a typo (``classifer``): the head it meant would silently stay
    frozen, so it is refused. The exception are the known head names of ``optional``
    (:data:`DEFAULT_TRAINABLE_MODULES` by default: ``classifier``, ``pooler``, ``classification_head``,
    ``qa_outputs``, ``score``): each exists in some model families and not in others by design (RoBERTa's and
    BART's classifiers have no pooler, only decoder classifiers have ``score``), so the default list, or such a
    name given explicitly, may find nothing in a model; that is logged at INFO.

    Raises:
        ConfigError: a name outside ``optional`` matches no module (see :func:`check_trainable_modules`); nothing
            is unfrozen then.
    """
    check_trainable_modules(model, trainable_modules, optional)
    unfrozen = []
    for name, module in model.named_modules():
        if name and any(name_matches(name, t) for t in trainable_modules):
            module.requires_grad_(True)
            unfrozen.append(name)
    unmatched = [t for t in trainable_modules if not any(name_matches(n, t) for n in unfrozen)]
    if unmatched:
        log.info("trainable_modules %s match nothing in %s (heads it does not have)", unmatched, type(model).__name__)
    return unfrozen
