"""The cubic budget schedule of AdaLoRA (docs/method.md §4) and the validation of its settings.

``step`` is always the 0-based count of optimizer steps already taken when the allocator runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from adalora_pl.errors import ConfigError


def resolve_steps(name: str, value: int | float, total_step: int) -> int:
    """``value`` steps (int >= 0) or a fraction of ``total_step`` (float in [0, 1)), as a number of steps."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number of steps (int) or a fraction of training (float), got {value!r}")
    if isinstance(value, float):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} as a fraction of training must be in [0, 1), got {value!r}")
        return int(round(value * total_step))
    if value < 0:
        raise ConfigError(f"{name} must be >= 0 steps, got {value}")
    return value


def validate_ranks(init_r: int, target_r: int) -> None:
    """Ranks must be positive and ``target_r <= init_r``."""
    for name, value in (("init_r", init_r), ("target_r", target_r)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if target_r > init_r:
        raise ConfigError(f"target_r ({target_r}) must not exceed init_r ({init_r}): pruning only removes rank")


def validate_betas(beta1: float, beta2: float) -> None:
    """EMA coefficients must lie in [0, 1)."""
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {value!r}")


def validate_schedule(tinit: int, tfinal: int, total_step: int, delta_t: int) -> None:
    """Step counts must be non-negative integers leaving a budgeting phase: ``tinit + tfinal < total_step``."""
    for name, value in (("tinit", tinit), ("tfinal", tfinal)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{name} must be a non-negative number of steps, got {value!r}")
    if not isinstance(total_step, int) or isinstance(total_step, bool) or total_step <= 0:
        raise ConfigError(f"total_step must be a positive number of optimizer steps, got {total_step!r}")
    if not isinstance(delta_t, int) or isinstance(delta_t, bool) or delta_t < 1:
        raise ConfigError(f"delta_t must be an integer >= 1 (steps between mask events), got {delta_t!r}")
    if tinit + tfinal >= total_step:
        raise ConfigError(
            f"tinit + tfinal must be < total_step to leave a budgeting phase: tinit={tinit} + "
            f"tfinal={tfinal} = {tinit + tfinal} >= total_step={total_step}. "
            "Decrease tinit/tfinal or train for more steps."
        )


def budget_at(step: int, *, init_budget: int, target_budget: int, tinit: int, tfinal: int, total_step: int) -> int:
    """Total rank budget after ``step`` optimizer steps (docs/method.md §4).

    ``init_budget`` until ``tinit``, a cubic decrease to ``target_budget`` at ``total_step - tfinal``,
    ``target_budget`` afterwards. The expression mirrors the reference so budgets agree exactly.
    """
    if step <= tinit:
        return init_budget
    if step > total_step - tfinal:
        return target_budget
    mul = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_budget - target_budget) * (mul**3) + target_budget)


def phase_at(step: int, *, tinit: int, tfinal: int, total_step: int) -> str:
    """``"warmup"`` (step <= tinit), ``"cubic"`` (up to and including total_step - tfinal) or ``"final"``."""
    if step <= tinit:
        return "warmup"
    if step <= total_step - tfinal:
        return "cubic"
    return "final"


@dataclass(frozen=True)
class BudgetSchedule:
    """A validated schedule in optimizer steps, with the budgets in number of triplets.

    Attributes:
        init_budget: b0 = init_r x number of adapted layers.
        target_budget: bT = target_r x number of adapted layers.
        tinit: steps of warm-up without pruning.
        tfinal: steps of final fine-tuning with the frozen pattern.
        total_step: T, total optimizer steps of the run.
        delta_t: steps between mask events in the cubic phase (absolute step multiples).
    """

    init_budget: int
    target_budget: int
    tinit: int
    tfinal: int
    total_step: int
    delta_t: int = 1

    def __post_init__(self) -> None:
        validate_schedule(self.tinit, self.tfinal, self.total_step, self.delta_t)
        if not 0 <= self.target_budget <= self.init_budget:
            raise ConfigError(
                f"target_budget ({self.target_budget}) must be in [0, init_budget={self.init_budget}]"
            )

    @property
    def final_step(self) -> int:
        """The step at which the pattern is fixed: ``total_step - tfinal``."""
        return self.total_step - self.tfinal

    def budget_at(self, step: int) -> int:
        return budget_at(
            step,
            init_budget=self.init_budget,
            target_budget=self.target_budget,
            tinit=self.tinit,
            tfinal=self.tfinal,
            total_step=self.total_step,
        )

    def phase_at(self, step: int) -> str:
        return phase_at(step, tinit=self.tinit, tfinal=self.tfinal, total_step=self.total_step)

    def describe(self) -> str:
        """One line for logs: budgets, steps and where the pattern is frozen."""
        return (f"b0={self.init_budget} -> bT={self.target_budget} triplets; T={self.total_step} optimizer steps, "
                f"tinit={self.tinit}, tfinal={self.tfinal} (pattern frozen at step {self.final_step}), "
                f"delta_t={self.delta_t}")

    def is_mask_step(self, step: int) -> bool:
        """Whether the cubic phase masks at ``step`` (absolute multiples of delta_t), or the pattern is
        being fixed (``step == final_step``, masked even off the delta_t grid, as PEFT does)."""
        phase = self.phase_at(step)
        if phase != "cubic":
            return False
        return step % self.delta_t == 0 or step == self.final_step
