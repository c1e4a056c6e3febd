"""``AdaLoRAConfig``: every setting of AdaLoRA's adapters and schedule in one validated object, and the table of
the methods the library trains.

The callback, the task modules, the checkpoints and the exports all read and write this one object (PEFT keeps the
same in its ``AdaLoraConfig``; :meth:`AdaLoRAConfig.to_peft` and :meth:`AdaLoRAConfig.from_peft` convert). On the
command line each field is an option of the module (``--model.init_r``): the task modules forward their keyword
arguments to this class, and LightningCLI reads its fields, types, defaults and the descriptions below.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from adalora_pl.errors import ConfigError
from adalora_pl.importance import Importance, validate_importance
from adalora_pl.injection import DEFAULT_TRAINABLE_MODULES
from adalora_pl.layers import ADAPTER_INITS, AdapterInit, Kernel, Scaling, check_kernel, check_scaling
from adalora_pl.schedule import resolve_steps, validate_betas, validate_ranks, validate_schedule

__all__ = [
    "METHODS", "RESUME_FIELDS", "AdaLoRAConfig", "Method", "MethodSpec", "config_for_method", "method_overrides",
    "method_spec",
]

#: The settings a resumed fit must share with its checkpoint: they define the importance averages, the budget schedule
#: and the objective the averages were collected under. ``scaling`` and ``adapter_init`` change the model being trained
#: (its update's scale; a weight-SVD start changes the base weight too); ``lr_ratio_b`` / ``lr_ratio_e`` because a
#: resume restores each optimizer group's learning rate from the checkpoint, so a changed ratio would silently not
#: apply. Checkpoints written before these fields existed hold their defaults.
RESUME_FIELDS = ("init_r", "target_r", "lora_alpha", "tinit", "tfinal", "total_step", "delta_t", "beta1", "beta2",
                 "importance", "orth_reg_weight", "scaling", "adapter_init", "lr_ratio_b", "lr_ratio_e")
# The step count a fraction is checked against while the run's total is not known yet (any large number will do:
# only the range of the fraction is checked then).
_UNKNOWN_TOTAL = 1_000_000


@dataclass(frozen=True)
class AdaLoRAConfig:
    """The settings of AdaLoRA (Zhang et al., ICLR 2023; docs/method.md): adapters, importance and budget schedule.

    Args:
        target_modules: name suffixes of the linear layers to adapt (``query`` matches
            ``bert.encoder.layer.0.attention.self.query``); None takes the preset of the model type.
        trainable_modules: name suffixes of modules trained in full next to the adapters (task heads).
        init_r: initial rank of every adapter (LoRA's rank for ``method=lora``).
        target_r: average final rank; the final budget is target_r times the number of adapters.
        lora_alpha: scaling numerator; AdaLoRA scales by lora_alpha / init_r, fixed as ranks are masked.
        lora_dropout: dropout on the adapter branch, in [0, 1).
        tinit: warm-up before pruning: optimizer steps (int) or a fraction of training (float in [0, 1)).
        tfinal: final fine-tuning with the pattern frozen: steps (int) or a fraction of training (float).
        delta_t: optimizer steps between two mask events of the cubic phase.
        beta1: EMA coefficient of the sensitivity, in [0, 1).
        beta2: EMA coefficient of the uncertainty, in [0, 1).
        orth_reg_weight: weight of the orthogonal regularizer (0 turns it off).
        importance: sensitivity_uncertainty (the paper's score), sensitivity or magnitude (the ablations).
        total_step: total optimizer steps; None reads it from the Trainer when fit starts.
        adapter_init: reference (A, B ~ N(0, 0.02), as the authors and PEFT), orthogonal, weight_svd (PiSSA-like:
            the top init_r singular triplets of each base weight, which keeps the residual) or gradient_svd
            (LoRA-GA-like: A and B the top init_r singular vectors of each base weight's loss gradient over the first
            gradient_init_batches training batches, E = 0; set by the callback when fit starts; docs/method.md §13).
        gradient_init_batches: adapter_init gradient_svd only: how many training batches the gradient is averaged
            over (>= 1).
        autocast_adapter_dtype: keep adapters float32 on a float16/bfloat16 base (as PEFT).
        lr_ratio_b: learning rate of the B factors (lora_B) over learning_rate, LoRA+-style; > 0, 1 = the reference.
        lr_ratio_e: learning rate of the singular values (lora_E, SVD adapters only) over learning_rate; > 0.
        scaling: alpha_over_r (the reference: lora_alpha / init_r; LoRA lora_alpha / r) or alpha_over_sqrt_r (rsLoRA:
            lora_alpha / sqrt(init_r)).
        rank_pattern: method lora only: a rank_pattern.json written by an AdaLoRA fit; each module trains LoRA at
            the rank the file gives it (rank 0: the module is not adapted).
        kernel: how the adapted layers compute: reference (the reference expressions, bitwise PEFT's) or fused (base
            matmul and adapter branch in one autograd Function with fewer passes over the activations, equal to the
            reference to float rounding; after tfinal only the kept triplets are computed; docs/method.md §14).
            AdaLoRA and LoRA adapters on float (not quantized, not sharded) bases; the others compute the reference.

    Raises:
        ConfigError: a value out of range; the message names the field, the value and what is allowed.
    """

    target_modules: Sequence[str] | None = None
    trainable_modules: Sequence[str] = tuple(DEFAULT_TRAINABLE_MODULES)
    init_r: int = 12
    target_r: int = 8
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    tinit: int | float = 0
    tfinal: int | float = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    importance: Importance = "sensitivity_uncertainty"
    total_step: int | None = None
    adapter_init: AdapterInit = "reference"
    gradient_init_batches: int = 8
    autocast_adapter_dtype: bool = True
    lr_ratio_b: float = 1.0
    lr_ratio_e: float = 1.0
    scaling: Scaling = "alpha_over_r"
    rank_pattern: str | None = None
    kernel: Kernel = "reference"

    def __post_init__(self) -> None:
        # Lists from YAML become tuples: the object is frozen and compares by value.
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not all(isinstance(t, str) for t in self.target_modules):
                raise ConfigError(f"target_modules must be a list of module name suffixes, got {self.target_modules!r}")
            if not self.target_modules:
                raise ConfigError("target_modules is empty: name at least one linear layer to adapt, or None for the "
                                  "preset of the model type")
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.trainable_modules, str):
            raise ConfigError(
                f"trainable_modules must be a list of module name suffixes, got {self.trainable_modules!r}")
        object.__setattr__(self, "trainable_modules", tuple(self.trainable_modules))
        validate_ranks(self.init_r, self.target_r)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        validate_betas(self.beta1, self.beta2)
        validate_importance(self.importance)
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if not isinstance(self.delta_t, int) or isinstance(self.delta_t, bool) or self.delta_t < 1:
            raise ConfigError(f"delta_t must be an integer >= 1, got {self.delta_t!r}")
        if self.adapter_init not in ADAPTER_INITS:
            raise ConfigError(f"adapter_init must be one of {list(ADAPTER_INITS)}, got {self.adapter_init!r}")
        batches = self.gradient_init_batches
        if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
            raise ConfigError(f"gradient_init_batches must be an integer >= 1, got {batches!r}")
        for name in ("lr_ratio_b", "lr_ratio_e"):
            check_lr_ratio(name, getattr(self, name))
        check_scaling(self.scaling)
        check_kernel(self.kernel)
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, str | os.PathLike) or not str(self.rank_pattern):
                raise ConfigError(f"rank_pattern must be the path of a rank_pattern.json file or None, got "
                                  f"{self.rank_pattern!r}")
            object.__setattr__(self, "rank_pattern", str(self.rank_pattern))  # JSON-safe in checkpoints
        total = self.total_step
        if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total <= 0):
            raise ConfigError(f"total_step must be a positive integer or None, got {total!r}")
        tinit, tfinal = self.schedule_steps(total or _UNKNOWN_TOTAL)  # checks the values now
        if total is not None:  # an explicit total is the user's own: a schedule that does not fit it is an error
            validate_schedule(tinit, tfinal, total, self.delta_t)

    # ------------------------------------------------------------------ the schedule in steps
    def schedule_steps(self, total_step: int) -> tuple[int, int]:
        """``(tinit, tfinal)`` in optimizer steps of a run of ``total_step`` steps (fractions resolved)."""
        return resolve_steps("tinit", self.tinit, total_step), resolve_steps("tfinal", self.tfinal, total_step)

    def resolved(self, total_step: int) -> AdaLoRAConfig:
        """This config for a run of ``total_step`` optimizer steps: ``total_step`` set, tinit/tfinal in steps.

        What a checkpoint records, and what a resumed run must match. A run too short for the schedule is not an
        error here (the callback then trains without pruning): :meth:`schedule_gap` says whether it is one.
        """
        tinit, tfinal = self.schedule_steps(total_step)
        if not isinstance(total_step, int) or isinstance(total_step, bool) or total_step <= 0:
            raise ConfigError(f"total_step must be a positive integer, got {total_step!r}")
        resolved = dataclasses.replace(self, tinit=tinit, tfinal=tfinal, total_step=None)
        object.__setattr__(resolved, "total_step", total_step)  # past __post_init__'s check of an explicit total
        return resolved

    def differences(self, other: AdaLoRAConfig, fields: Sequence[str] | None = None) -> list[str]:
        """``"name self -> other"`` for each field (of ``fields``, default all) where the two differ."""
        names = fields or [f.name for f in dataclasses.fields(self)]
        return [f"{n} {getattr(self, n)!r} -> {getattr(other, n)!r}" for n in names
                if getattr(self, n) != getattr(other, n)]

    def check_resume(self, saved: Mapping[str, Any]) -> None:
        """Refuse to resume this (resolved) run from a checkpoint whose resolved settings ``saved`` differ in a
        :data:`RESUME_FIELDS` field: the averages and the schedule would belong to another run.

        Raises:
            ConfigError: naming each changed field with both values.
        """
        changed = AdaLoRAConfig.from_dict(saved).differences(self, RESUME_FIELDS)
        if changed:
            raise ConfigError(
                f"cannot resume AdaLoRA from this checkpoint: its settings differ from this run's: {', '.join(changed)}"
                " (total_step counts the optimizer steps of max_epochs/max_steps when not given). Resume with the "
                "checkpoint's settings, or start a new fit from its weights to change them."
            )

    def schedule_gap(self) -> str | None:
        """For a resolved config: why its run has no budgeting phase (too few steps for tinit + tfinal), or None."""
        try:
            validate_schedule(self.tinit, self.tfinal, self.total_step, self.delta_t)
        except ConfigError:
            return (f"{self.total_step} optimizer steps leave no budgeting phase after tinit={self.tinit} and before "
                    f"tfinal={self.tfinal}")
        return None

    # ------------------------------------------------------------------ JSON and PEFT
    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON types (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AdaLoRAConfig:
        """The config written by :meth:`to_dict`; an unknown key is an error naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown AdaLoRA settings {unknown}; known: {sorted(known)}")
        return cls(**values)

    def to_peft(self) -> dict[str, Any]:
        """The fields of PEFT's ``AdaLoraConfig`` this config fixes (its names: ``deltaT``), for a resolved config.

        ``target_modules``, ``init_r`` and the rank pattern of a trained model are read from its adapters by
        :func:`~adalora_pl.io.export_peft`; the ones here are the schedule's.
        """
        if self.total_step is None or not all(isinstance(v, int) for v in (self.tinit, self.tfinal)):
            raise ConfigError("PEFT's AdaLoraConfig needs the schedule in steps: use config.resolved(total_step)")
        return {
            "init_r": self.init_r, "target_r": self.target_r, "tinit": self.tinit, "tfinal": self.tfinal,
            "deltaT": self.delta_t, "beta1": self.beta1, "beta2": self.beta2, "orth_reg_weight": self.orth_reg_weight,
            "total_step": self.total_step, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
        }

    @classmethod
    def from_peft(cls, peft_config: Any) -> AdaLoRAConfig:
        """The config of a PEFT ``AdaLoraConfig`` (the object, or the dict of its ``adapter_config.json``).

        PEFT's ``lora_alpha <= 0`` means "scale by 1" (``lora_alpha = init_r``), as PEFT computes it.
        """
        values = peft_config if isinstance(peft_config, Mapping) else vars(peft_config)
        init_r = int(values["init_r"])
        alpha = values.get("lora_alpha", 8)
        target_modules = values.get("target_modules")
        if isinstance(target_modules, str):  # PEFT also takes one regular expression; ours are suffixes
            raise ConfigError(f"PEFT target_modules {target_modules!r} is a regular expression; pass the names")
        return cls(
            target_modules=sorted(target_modules) if target_modules else None,
            init_r=init_r, target_r=int(values.get("target_r", 8)),
            lora_alpha=float(alpha) if alpha > 0 else float(init_r),
            lora_dropout=float(values.get("lora_dropout", 0.0)),
            tinit=int(values.get("tinit", 0)), tfinal=int(values.get("tfinal", 0)),
            delta_t=int(values.get("deltaT", 1)), beta1=float(values.get("beta1", 0.85)),
            beta2=float(values.get("beta2", 0.85)), orth_reg_weight=float(values.get("orth_reg_weight", 0.5)),
            total_step=values.get("total_step"),
        )


def check_lr_ratio(name: str, value: Any) -> None:
    """Refuse a learning-rate ratio that is not a finite number > 0.

    Raises:
        ConfigError: naming the field, the value and what is allowed.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0 (1 keeps the learning_rate), got {value!r}")


# ---------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class MethodSpec:
    """What a ``method`` name of the task modules means.

    Attributes:
        adapter: the adapter kind injected (a key of :data:`adalora_pl.baselines.ADAPTER_CLASSES`), None for full
            fine-tuning.
        budget: how its #Params are planned for ``param_budget`` (:func:`adalora_pl.baselines.params_for_rank`).
        scheduled: whether a rank allocator runs (the module brings its callback).
        overrides: settings of :class:`AdaLoRAConfig` the method fixes (SVD-LoRA keeps the budget constant).
    """

    adapter: str | None
    budget: str | None
    scheduled: bool
    overrides: tuple[tuple[str, Any], ...] = ()


#: adalora: the method. lora / full: the paper's main baselines. houlsby / pfeiffer: bottleneck adapters.
#: svd_lora (SVD adapters, no pruning) and prune_lora (LoRA doublets pruned without recovery): ablations.
Method = Literal["adalora", "svd_lora", "prune_lora", "lora", "houlsby", "pfeiffer", "full"]
_CONSTANT_RANK = (("target_r", "init_r"),)
METHODS: dict[str, MethodSpec] = {
    "adalora": MethodSpec("adalora", "adalora", scheduled=True),
    "svd_lora": MethodSpec("adalora", "adalora", scheduled=True, overrides=_CONSTANT_RANK),
    "prune_lora": MethodSpec("prune_lora", "lora", scheduled=True, overrides=(("orth_reg_weight", 0.0),)),
    # No schedule: the rank stays init_r (target_r is not used; set equal so that it cannot be refused).
    "lora": MethodSpec("lora", "lora", scheduled=False, overrides=_CONSTANT_RANK),
    "houlsby": MethodSpec("bottleneck", "bottleneck", scheduled=False, overrides=_CONSTANT_RANK),
    "pfeiffer": MethodSpec("bottleneck", "bottleneck", scheduled=False, overrides=_CONSTANT_RANK),
    "full": MethodSpec(None, None, scheduled=False, overrides=_CONSTANT_RANK),
}
assert tuple(METHODS) == get_args(Method), "the Method type (command-line choices) and METHODS must list the same names"


def method_spec(method: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``method``; an unknown name is an error listing the known ones."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {list(METHODS)}, got {method!r}")
    return METHODS[method]


def method_overrides(method: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings ``method`` fixes, given the user's ``settings`` (an override naming another field takes that
    field's value): applied before validation, so that a LoRA run at ``init_r=4`` is not refused for the unused
    default ``target_r=8``."""
    defaults = {f.name: f.default for f in dataclasses.fields(AdaLoRAConfig)}
    return {key: settings.get(value, defaults[value]) if isinstance(value, str) and value in defaults else value
            for key, value in method_spec(method).overrides}


def config_for_method(method: str, **settings: Any) -> AdaLoRAConfig:
    """The :class:`AdaLoRAConfig` of ``settings`` as ``method`` runs it (:func:`method_overrides` applied)."""
    return AdaLoRAConfig(**{**settings, **method_overrides(method, settings)})
