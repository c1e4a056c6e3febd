"""``AdaLoRACallback``: AdaLoRA for any LightningModule, with one line in the Trainer's callbacks."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from adalora_pl.allocator import MaskEvent, RankAllocator
from adalora_pl.errors import ConfigError
from adalora_pl.importance import Importance, orthogonal_regularizer, validate_importance
from adalora_pl.injection import DEFAULT_TRAINABLE_MODULES, find_adapters, inject_adapters, preset_targets
from adalora_pl.layers import ADAPTER_INITS, HALF_DTYPES, AdapterInit, SVDLinear
from adalora_pl.schedule import resolve_steps, validate_betas, validate_ranks, validate_schedule

# Strategies that shard parameters: importance needs every rank to hold whole adapters and their gradients.
SHARDING_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)

log = logging.getLogger(__name__)


def _find_model_for_preset(module: torch.nn.Module) -> torch.nn.Module:
    """The first submodule carrying a transformers ``config`` (to look up target presets)."""
    for sub in module.modules():
        if getattr(getattr(sub, "config", None), "model_type", None):
            return sub
    return module


def broadcast_keep_mask(keep: torch.Tensor) -> torch.Tensor:
    """Rank 0's boolean keep-mask on every rank: one ``torch.distributed.broadcast`` of a uint8 tensor on the
    process group's device (CUDA for NCCL, CPU otherwise); nothing is pickled."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buffer = keep.to(device=device, dtype=torch.uint8)
    dist.broadcast(buffer, src=0)
    return buffer.to(device=keep.device, dtype=torch.bool)


def _grad_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The enabled GradScaler of a "16-mixed" run (None for other precisions)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


# The settings a resumed fit must share with its checkpoint: they define the importance averages, the budget
# schedule and the objective the averages were collected under.
RESUME_SETTINGS = ("init_r", "target_r", "lora_alpha", "tinit", "tfinal", "total_step", "delta_t", "beta1", "beta2",
                   "importance", "orth_reg_weight")


class AdaLoRACallback(Callback):
    r"""Run AdaLoRA (Zhang et al., ICLR 2023) on a LightningModule: adapters, regularizer, pruning.

    At ``setup`` the callback injects SVD adapters into the module (or adopts the ones it already has) and
    freezes everything else except the ``trainable_modules``, so that ``configure_optimizers`` sees the adapters.
    At ``on_fit_start``, once the module's own ``setup`` has built its datasets and the strategy has set up model and
    optimizer, it fixes the schedule in optimizer steps. At every optimizer step it adds the orthogonal
    regularizer's gradient (before gradient clipping), updates the importance averages right after
    ``optimizer.step()`` from the gradients just applied (an optimizer hook, so it works under manual optimization
    too, whenever the user calls ``zero_grad``), and masks singular values to the current budget at the end of the
    batch: the call order of the reference training loop (docs/method.md §6).

    Args:
        target_modules: name suffixes of the linear layers to adapt (``"query"`` matches
            ``bert.encoder.layer.0.attention.self.query``). ``None`` uses the preset for the model type
            of the first transformers model inside the module.
        trainable_modules: name suffixes of modules trained in full (task heads such as ``classifier``,
            ``pooler``, ``qa_outputs``).
        init_r: initial rank of every adapter.
        target_r: average final rank; the final budget is ``target_r`` times the number of adapters.
        lora_alpha: adapter scaling numerator (scaling = lora_alpha / (init_r + 1e-5), fixed as ranks are masked).
        lora_dropout: dropout on the adapter branch.
        tinit: warm-up before pruning, in optimizer steps (int) or as a fraction of training (float).
        tfinal: final fine-tuning with the frozen pattern, in steps (int) or as a fraction (float).
        delta_t: optimizer steps between two mask events during the cubic phase.
        beta1: EMA coefficient of the sensitivity.
        beta2: EMA coefficient of the uncertainty.
        orth_reg_weight: weight of the orthogonal regularizer (0 disables it). Its gradient is added
            once per optimizer step whatever computes the loss.
        importance: ``"sensitivity_uncertainty"`` (default), ``"sensitivity"`` or ``"magnitude"``.
        total_step: total optimizer steps T. Default: ``trainer.estimated_stepping_batches``, read at
            ``on_fit_start`` (when the module's datasets exist).
        rank_pattern_file: file name written into the log dir at the end of fit.
        autocast_adapter_dtype: adapters of a float16/bfloat16 model are kept in float32 (default, as PEFT),
            also when a "bf16-true"/"16-true" Trainer converts the module (the adapters refuse the cast, so their
            values stay exact before any strategy wraps the module). False: the model's dtype.
        adapter_init: initialization of injected adapters: ``"reference"`` (the authors' and PEFT's) or
            ``"orthogonal"`` (see :class:`~adalora_pl.layers.SVDLinear`).

    Behaviour a Lightning project can rely on:

    - Adapters are injected (or adopted) for every stage, so ``trainer.validate/test/predict(module,
      ckpt_path=...)`` restore a checkpoint of a fit with the callback; the allocator exists only for fit.
    - A run too short for the schedule (``fast_dev_run``, or fewer optimizer steps than ``tinit + tfinal`` + 1)
      trains the adapters at ``init_r`` without pruning, after one warning.
    - Every checkpoint holds the ranks the run reports: masked singular values are zero in its ``state_dict``
      even between mask events (where a masked triplet keeps training and may come back); their live values
      travel in the callback's state, so resuming is still exact.
    - Resuming needs the checkpoint's settings: a changed ``target_r``, ``importance``, schedule or total number of
      steps (from ``max_epochs``/``max_steps``) is refused with the values named.
    - Under "16-mixed" the regularizer and the importance see unscaled gradients with every optimizer (the callback
      unscales for optimizers that would unscale inside their own step, such as fused AdamW), and a step the
      GradScaler skips leaves the importance averages unchanged. With other precisions an inf/NaN gradient stops
      the fit with the step named, before the optimizer writes it into the parameters (one host sync per step).
    - At the end of training the masked triplets are zeroed, so the returned model has exactly the ranks of
      ``rank_pattern.json``. The progress bar shows ``adalora/rank`` (triplets kept by the last mask); per-layer
      ranks are logged at mask events on the Trainer's ``log_every_n_steps`` grid and at the final mask.
    - A module that builds its model in ``configure_model`` gets it called once earlier, inside the same contexts
      as Lightning's call; like Lightning, the callback expects that hook to be idempotent. The model must exist
      when the callback's ``setup`` runs (Lightning calls it before the module's ``setup``).

    Example::

        trainer = Trainer(callbacks=[AdaLoRACallback(target_modules=["query", "value"], init_r=12,
                                                     target_r=8, tinit=0.1, tfinal=0.3)])
        trainer.fit(my_module)
    """

    # What the callback injects or adopts; subclasses for other prunable adapters change these.
    adapter_class: type = SVDLinear
    allocator_class: type[RankAllocator] = RankAllocator

    def __init__(
        self,
        target_modules: Sequence[str] | None = None,
        trainable_modules: Sequence[str] = tuple(DEFAULT_TRAINABLE_MODULES),
        init_r: int = 12,
        target_r: int = 8,
        lora_alpha: float = 32,
        lora_dropout: float = 0.0,
        tinit: int | float = 0,
        tfinal: int | float = 0,
        delta_t: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
        orth_reg_weight: float = 0.1,
        importance: Importance = "sensitivity_uncertainty",
        total_step: int | None = None,
        rank_pattern_file: str = "rank_pattern.json",
        autocast_adapter_dtype: bool = True,
        adapter_init: AdapterInit = "reference",
    ) -> None:
        validate_ranks(init_r, target_r)
        if adapter_init not in ADAPTER_INITS:
            raise ConfigError(f"adapter_init must be one of {list(ADAPTER_INITS)}, got {adapter_init!r}")
        validate_betas(beta1, beta2)
        validate_importance(importance)
        if orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be >= 0, got {orth_reg_weight}")
        if not isinstance(delta_t, int) or isinstance(delta_t, bool) or delta_t < 1:
            raise ConfigError(f"delta_t must be an integer >= 1, got {delta_t!r}")
        if total_step is not None and (not isinstance(total_step, int) or total_step <= 0):
            raise ConfigError(f"total_step must be a positive integer or None, got {total_step!r}")
        for name, value in (("tinit", tinit), ("tfinal", tfinal)):
            resolve_steps(name, value, total_step or 1_000_000)
        if total_step is not None:  # an explicit total is the user's own: a schedule that does not fit it is an error
            validate_schedule(resolve_steps("tinit", tinit, total_step), resolve_steps("tfinal", tfinal, total_step),
                              total_step, delta_t)
        self.target_modules = list(target_modules) if target_modules is not None else None
        self.trainable_modules = list(trainable_modules)
        self.init_r, self.target_r = init_r, target_r
        self.lora_alpha, self.lora_dropout = lora_alpha, lora_dropout
        self.tinit, self.tfinal, self.delta_t = tinit, tfinal, delta_t
        self.beta1, self.beta2 = beta1, beta2
        self.orth_reg_weight = orth_reg_weight
        self.importance = importance
        self.total_step = total_step
        self.rank_pattern_file = rank_pattern_file
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self.adapter_init = adapter_init

        self.allocator: RankAllocator | None = None
        self.budget: int | None = None
        self._adapters: dict[str, torch.nn.Module] = {}
        self._last_global_step = 0
        self._pending_state: dict | None = None
        self._restored = False
        self._trainer: pl.Trainer | None = None
        self._step_hooks: list[Any] = []
        self._checked_params: list[torch.nn.Parameter] = []
        self._ranks_logged_at: int | None = None

    # One key whatever the settings (Lightning's default would be the class name too): a resume with changed settings
    # must find the checkpoint's state to say what changed, not silently start the averages from zero.
    @property
    def state_key(self) -> str:
        return type(self).__qualname__

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._refuse_unsupported_strategy(trainer)
        self._build_model_first(trainer, pl_module)
        if next(pl_module.parameters(), None) is None:
            raise ConfigError(
                f"AdaLoRACallback found no parameters in {type(pl_module).__name__} at setup: Lightning calls the "
                "callbacks' setup before the module's own setup, and the adapters must exist before "
                "configure_optimizers. Build the model in __init__ or in configure_model."
            )
        # Injected here, not later: the optimizer, built when the strategy sets up, must hold the adapters. The
        # schedule waits for on_fit_start, when the module's setup has built its datasets.
        self._adapters = self._inject_or_adopt(pl_module)

    @staticmethod
    def _refuse_unsupported_strategy(trainer: pl.Trainer) -> None:
        if isinstance(trainer.strategy, SHARDING_STRATEGIES):
            raise RuntimeError(
                f"AdaLoRACallback does not support {type(trainer.strategy).__name__}: importance needs every rank "
                "to hold full adapter parameters and gradients. Use strategy='ddp' (adapters are small)."
            )

    @staticmethod
    def _build_model_first(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Call the module's ``configure_model`` now, in the contexts Lightning uses for it.

        Lightning runs ``Callback.setup`` before ``configure_model``, but the adapters must be in the module
        before the optimizer is configured; Lightning's own later call must then find the model built.
        """
        if not is_overridden("configure_model", pl_module, pl.LightningModule):
            return
        with (
            trainer.strategy.tensor_init_context(),
            trainer.strategy.model_sharded_context(),
            trainer.precision_plugin.module_init_context(),
        ):
            pl_module.configure_model()

    def _inject_or_adopt(self, pl_module: pl.LightningModule) -> dict[str, torch.nn.Module]:
        """The module's adapters: the ones it has, or new ones injected into the target layers."""
        adapters = find_adapters(pl_module)
        if not adapters:
            targets = self.target_modules or preset_targets(_find_model_for_preset(pl_module), self.trainable_modules)
            adapters = inject_adapters(
                pl_module,
                targets,
                method=self.adapter_class,
                r=self.init_r,
                lora_alpha=self.lora_alpha,
                lora_dropout=self.lora_dropout,
                trainable_modules=self.trainable_modules,
                autocast_adapter_dtype=self.autocast_adapter_dtype,
                **({"adapter_init": self.adapter_init} if self.adapter_init != "reference" else {}),
            )
            rank_zero_info(f"AdaLoRA: injected {len(adapters)} {self.adapter_class.__name__} adapters "
                           f"(init_r={self.init_r})")
        else:
            others = [n for n, m in adapters.items() if not isinstance(m, self.adapter_class)]
            if others:
                raise TypeError(
                    f"{type(self).__name__} needs {self.adapter_class.__name__} adapters; the module has other "
                    f"adapter layers ({others[:3]}...). Remove the callback for a plain LoRA or adapter run."
                )
            rank_zero_info(f"AdaLoRA: adopting the {len(adapters)} adapters the module already has")
        return adapters

    def _estimated_total_steps(self, trainer: pl.Trainer) -> int:
        try:
            estimated = trainer.estimated_stepping_batches
        except Exception as err:  # a dataloader that cannot be built: say what the callback needed it for
            raise RuntimeError(
                f"AdaLoRACallback could not read the number of optimizer steps from the Trainer ({type(err).__name__}: "
                f"{err}); pass total_step= or fix the train dataloader"
            ) from err
        if not math.isfinite(estimated):
            raise ConfigError(
                "the number of optimizer steps is unbounded (max_steps=-1 and max_epochs=-1, or an iterable "
                "dataset without length); AdaLoRA's schedule needs total_step= or a finite run"
            )
        return int(estimated)

    def resolved_settings(self, total_step: int) -> dict[str, Any]:
        """The settings that define this run's allocation, with tinit/tfinal in steps of ``total_step``."""
        return {
            "init_r": self.init_r, "target_r": self.target_r, "lora_alpha": self.lora_alpha,
            "tinit": resolve_steps("tinit", self.tinit, total_step),
            "tfinal": resolve_steps("tfinal", self.tfinal, total_step), "total_step": total_step,
            "delta_t": self.delta_t, "beta1": self.beta1, "beta2": self.beta2, "importance": self.importance,
            "orth_reg_weight": self.orth_reg_weight,
        }

    def _schedule_problem(self, trainer: pl.Trainer, settings: dict[str, Any]) -> str | None:
        """Why this fit cannot run the schedule (it then trains without pruning), or None."""
        if trainer.fast_dev_run:
            return f"fast_dev_run={trainer.fast_dev_run}"
        try:
            validate_schedule(settings["tinit"], settings["tfinal"], settings["total_step"], settings["delta_t"])
        except ConfigError:
            return (f"{settings['total_step']} optimizer steps leave no budgeting phase after "
                    f"tinit={settings['tinit']} and before tfinal={settings['tfinal']}")
        return None

    def _build_allocator(self, adapters: dict[str, SVDLinear], settings: dict[str, Any], trainer: pl.Trainer) -> None:
        sync = broadcast_keep_mask if trainer.world_size > 1 else None
        self.allocator = self._new_allocator(adapters, settings["tinit"], settings["tfinal"], settings["total_step"],
                                             self.delta_t, sync)
        s = self.allocator.schedule
        self.budget = s.budget_at(0)
        rank_zero_info(
            f"AdaLoRA schedule: b0={s.init_budget} -> bT={s.target_budget} triplets over {len(adapters)} adapters; "
            f"T={s.total_step} optimizer steps, tinit={s.tinit}, tfinal={s.tfinal} (pattern frozen at step "
            f"{s.final_step}), delta_t={s.delta_t}, importance={self.importance}, "
            f"orth_reg_weight={self.orth_reg_weight}"
        )

    def _new_allocator(self, adapters, tinit: int, tfinal: int, total_step: int, delta_t: int, sync) -> RankAllocator:
        # Under DDP every rank computes the same mask from all-reduced gradients; the broadcast from rank 0
        # (at mask events only) makes that a guarantee rather than an assumption.
        return self.allocator_class(
            adapters, target_r=self.target_r, tinit=tinit, tfinal=tfinal, total_step=total_step, delta_t=delta_t,
            beta1=self.beta1, beta2=self.beta2, importance=self.importance, sync_keep=sync,
        )

    # ------------------------------------------------------------------ start of fit
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        current = find_adapters(pl_module)
        if any(current.get(name) is not layer for name, layer in self._adapters.items()):
            raise RuntimeError(
                f"the adapters injected at setup are no longer in {type(pl_module).__name__}: its configure_model "
                "rebuilt the model. Make configure_model idempotent (build the model only if it does not exist yet)."
            )
        self._check_adapter_dtype()
        # The module's setup has run and the strategy has built the optimizer: the number of steps is known now.
        settings = self.resolved_settings(self.total_step or self._estimated_total_steps(trainer))
        pending, self._pending_state = self._pending_state, None
        if pending is not None:
            self._refuse_changed_settings(pending, settings)
        problem = self._schedule_problem(trainer, settings)
        if problem is not None:
            rank_zero_warn(f"AdaLoRA: {problem}: this fit trains the adapters at init_r={self.init_r} without "
                           "pruning (no importance, no masks, no rank pattern written)")
            self.allocator = None
        else:
            self._build_allocator(self._adapters, settings, trainer)
            if pending is not None:
                self._load_allocator_state(pending)
        self._trainer = trainer
        self._checked_params = [p for p in pl_module.parameters() if p.requires_grad]
        if self.allocator is not None:
            self._hook_optimizer(trainer)

    def _check_adapter_dtype(self) -> None:
        if not self.autocast_adapter_dtype:
            return
        half = [name for name, layer in self._adapters.items()
                if any(p.dtype in HALF_DTYPES for p in layer.adapter_parameters())]
        if half:
            # Module.to cannot do this (the adapters refuse the cast); something assigned .data directly.
            raise RuntimeError(
                f"{len(half)} adapters ({half[:2]}...) are float16/bfloat16 although autocast_adapter_dtype=True: "
                "something converted their tensors outside Module.to; convert the model before fit or pass "
                "autocast_adapter_dtype=False"
            )

    def _refuse_changed_settings(self, state: dict[str, Any], settings: dict[str, Any]) -> None:
        saved = state["settings"]
        changed = [f"{k} {saved[k]!r} -> {settings[k]!r}" for k in RESUME_SETTINGS if saved[k] != settings[k]]
        if changed:
            why = (" (total_step comes from the Trainer's max_epochs/max_steps and the data when not given)"
                   if saved["total_step"] != settings["total_step"] and self.total_step is None else "")
            raise ConfigError(
                f"cannot resume AdaLoRA from this checkpoint: its settings differ from this run's: {', '.join(changed)}"
                f"{why}. Resume with the checkpoint's settings, or start a new fit from its weights to change them."
            )

    def _hook_optimizer(self, trainer: pl.Trainer) -> None:
        """Register :meth:`_after_optimizer_step` on the optimizer that holds the adapters."""
        assert self.allocator is not None
        tracked = {id(p) for p in self.allocator.params}
        holders = [opt for opt in trainer.optimizers
                   if tracked & {id(p) for group in opt.param_groups for p in group["params"]}]
        held = {id(p) for opt in holders for group in opt.param_groups for p in group["params"]} & tracked
        if len(holders) != 1 or held != tracked:
            where = ("none of the Trainer's optimizers holds them" if not holders else
                     f"{len(holders)} optimizers hold them" if len(holders) > 1 else
                     f"the optimizer holds {len(held)} of them")
            raise RuntimeError(
                f"AdaLoRA needs one optimizer holding all {len(tracked)} adapter parameters; {where}. Build the "
                "optimizer in configure_optimizers from the module's trainable parameters (the callback injects the "
                "adapters at setup, before configure_optimizers runs)."
            )
        self._step_hooks = [holders[0].register_step_post_hook(self._after_optimizer_step)]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The loops' progress is restored after on_fit_start: only now does global_step say whether this resumes.
        if self.allocator is not None and trainer.global_step > 0 and not self._restored:
            rank_zero_warn(
                f"AdaLoRA: resuming at optimizer step {trainer.global_step} from a checkpoint without AdaLoRA state "
                "(saved without this callback): the importance averages start from zero here"
            )
        self._last_global_step = trainer.global_step

    # ------------------------------------------------------------------ per step
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Gradients are complete here (all micro-batches, all-reduced) and clipping has not run yet, so the
        # regularizer enters exactly as in loss + w * R.
        layers = list(self._adapters.values())
        if not layers or all(p.grad is None for m in layers for p in m.adapter_parameters()):
            return  # the training step was skipped (or this optimizer holds no adapter): nothing to do
        scaler = _grad_scaler(trainer)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # Lightning leaves unscaling to such optimizers' own step (fused AdamW); the regularizer and the
            # importance need true gradients. scaler.step() then knows they are unscaled already.
            scaler.unscale_(optimizer)
        if self.orth_reg_weight > 0 and isinstance(layers[0], SVDLinear):
            self._add_regularizer_gradient(pl_module, layers)
        if scaler is None:
            self._stop_on_nonfinite_gradients(trainer)

    def _add_regularizer_gradient(self, pl_module: pl.LightningModule, layers: list[SVDLinear]) -> None:
        factors = [(m.lora_A, m.lora_B) for m in layers]
        factor_params = [p for pair in factors for p in pair]
        with torch.enable_grad():
            reg = orthogonal_regularizer(factors)
            grads = torch.autograd.grad(reg * self.orth_reg_weight, factor_params)
        with torch.no_grad():
            for p, g in zip(factor_params, grads, strict=True):
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
        pl_module.log("adalora/orth_reg", reg.detach(), on_step=True, on_epoch=False)

    def _stop_on_nonfinite_gradients(self, trainer: pl.Trainer) -> None:
        """Raise before the optimizer writes an inf/NaN gradient into the parameters (no GradScaler to skip it)."""
        grads = [p.grad for p in self._checked_params if p.grad is not None]
        if not grads:
            return
        # The largest |g| of each tensor: finite for any finite gradient (a norm could overflow), NaN propagates.
        finite = torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().all()
        if not bool(finite):  # one host sync per step
            raise FloatingPointError(
                f"AdaLoRA: inf/NaN gradients at optimizer step {trainer.global_step} (the loss or a gradient "
                "overflowed); stopped before the optimizer writes them into the parameters. Lower the learning "
                "rate, clip gradients (gradient_clip_val), or use precision='16-mixed', whose GradScaler skips such "
                "steps."
            )

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Right after ``optimizer.step()``: the importance averages read the weights just updated and the gradients
        just applied (PEFT's ``update_and_allocate`` runs here too), before anyone can call ``zero_grad``."""
        allocator, trainer = self.allocator, self._trainer
        if allocator is None or trainer is None or allocator.frozen:
            return
        # Lightning counts the step as completed after optimizer.step() returns: global_step is this step's index.
        if trainer.global_step >= allocator.schedule.final_step:
            return
        applied = None
        found_inf = getattr(optimizer, "found_inf", None)  # set by GradScaler.step() for optimizers that unscale
        if isinstance(found_inf, torch.Tensor):  # themselves: they skip the update internally when it is nonzero
            applied = found_inf == 0
        allocator.update_importance(applied)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.allocator is None or trainer.global_step == self._last_global_step:
            return  # accumulating gradients: no optimizer step on this batch
        # Normally one step per batch; manual optimization may take several (each gets its schedule call).
        for step in range(self._last_global_step, trainer.global_step):
            event = self.allocator.allocate(step)
            if step == self.allocator.schedule.total_step - 1:
                # Between mask events a masked triplet keeps training (it may come back at the next event); with
                # tfinal = 0 the last event may lie steps before the end. The last step leaves the ranks of the last
                # mask, before any end-of-training checkpoint is written, as rank_pattern.json and exports say.
                self.allocator.apply_rank_pattern()
            if event.masked:
                self._log_mask_event(trainer, event)
        self._last_global_step = trainer.global_step
        self.budget = event.budget
        pl_module.log("adalora/budget", float(event.budget), on_step=True, on_epoch=False)
        pl_module.log("adalora/rank", self.allocator.kept_total().float(), on_step=True, on_epoch=False, prog_bar=True)

    def _log_mask_event(self, trainer: pl.Trainer, event: MaskEvent) -> None:
        """Total and per-layer ranks after a mask event: on rank zero only, and only at mask events on the Trainer's
        ``log_every_n_steps`` grid or the one that fixes the pattern (the host syncs stay off the other steps)."""
        assert self.allocator is not None
        if trainer.logger is None or not trainer.is_global_zero:
            return
        final = event.step == self.allocator.schedule.final_step
        last = self._ranks_logged_at
        if not final and last is not None and event.step - last < max(1, trainer.log_every_n_steps):
            return
        self._ranks_logged_at = event.step
        ranks = self.allocator.kept_ranks()
        metrics = {
            "adalora/total_rank": float(sum(ranks.values())),
            "adalora/mask_threshold": float(event.threshold) if event.threshold is not None else 0.0,
        }
        metrics.update({f"adalora_rank/{name}": float(r) for name, r in ranks.items()})
        trainer.logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ end of fit
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.allocator is not None:
            # Also when training stops before total_step (early stopping, max_time): the model fit returns has
            # the ranks of the last mask.
            self.allocator.apply_rank_pattern()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.allocator is None:
            return
        try:
            # trainer.log_dir is a collective under DDP: every rank asks, rank zero writes.
            self._write_rank_pattern(trainer.log_dir or trainer.default_root_dir, trainer.logger)
        finally:
            # Ranks leave fit together, also when rank zero failed to write: a gloo worker that exits while rank
            # zero still writes can abort in its process-group teardown, and a rank left alone would hang.
            trainer.strategy.barrier("adalora_rank_pattern")

    @rank_zero_only
    def _write_rank_pattern(self, directory: str, logger: Any = None) -> None:
        assert self.allocator is not None
        os.makedirs(directory, exist_ok=True)
        pattern = self.allocator.rank_pattern()
        s = self.allocator.schedule
        payload = {
            "schedule": {
                "init_budget": s.init_budget, "target_budget": s.target_budget, "tinit": s.tinit,
                "tfinal": s.tfinal, "total_step": s.total_step, "delta_t": s.delta_t,
                "frozen": self.allocator.frozen, "last_step": self.allocator.last_step,
            },
            "total_rank": sum(sum(m) for m in pattern.values()),
            "modules": {name: {"rank": sum(mask), "mask": mask} for name, mask in pattern.items()},
        }
        path = os.path.join(directory, self.rank_pattern_file)
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)
        rank_zero_info(f"AdaLoRA: final total rank {payload['total_rank']}; rank pattern written to {path}")
        try:
            self._write_allocation_report(directory, pattern, logger)
        except Exception as err:  # a picture is never worth a failed fit: the pattern is already on disk
            rank_zero_warn(f"AdaLoRA: could not draw the allocation report ({type(err).__name__}: {err}); "
                           f"the rank pattern is in {path}")

    def _write_allocation_report(self, directory: str, pattern: dict[str, list[bool]], logger: Any) -> None:
        """The paper-style heatmap (layer x module type) and the planned budget curve, as PNG files next to
        the rank pattern and, with a TensorBoard logger, as images."""
        from adalora_pl.io.report import save_budget_curve, save_rank_heatmap

        assert self.allocator is not None
        s = self.allocator.schedule
        heatmap = os.path.join(directory, "rank_heatmap.png")
        curve = os.path.join(directory, "budget_curve.png")
        save_rank_heatmap(pattern, heatmap, title=f"Final ranks (total {sum(map(sum, pattern.values()))})")
        steps = list(range(s.total_step))
        save_budget_curve(steps, [s.budget_at(t) for t in steps], curve)
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            import matplotlib.image

            for tag, png in (("adalora/rank_heatmap", heatmap), ("adalora/budget_curve", curve)):
                image = matplotlib.image.imread(png)[..., :3]
                experiment.add_image(tag, image, dataformats="HWC")

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        if self.allocator is None:
            return {}
        s = self.allocator.schedule
        settings = self.resolved_settings(s.total_step)
        settings.update(tinit=s.tinit, tfinal=s.tfinal)
        return {
            "settings": settings,
            "allocator": self.allocator.state_dict(),
            "last_global_step": self._last_global_step,
            # The checkpoint's state_dict has masked singular values zeroed (see on_save_checkpoint); the live
            # values, which may still come back at the next mask event, resume from here.
            "live_lora_E": {name: layer.lora_E.detach().clone() for name, layer in self._adapters.items()
                            if isinstance(layer, SVDLinear)},
        }

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Every checkpoint holds the ranks the run reports (the last mask), also one written between mask events:
        # evaluation, export and `validate --ckpt_path` read these weights.
        state = checkpoint.get("state_dict")
        if self.allocator is None or state is None:
            return
        for name, layer in self._adapters.items():
            key = f"{name}.lora_E"
            if isinstance(layer, SVDLinear) and key in state:
                state[key] = state[key].masked_fill(~layer.rank_mask.view(-1, 1).to(state[key].device), 0.0)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            # Lightning restores callbacks before the strategy sets up and before on_fit_start knows the number of
            # steps: the state is checked against this run's settings and applied there.
            self._pending_state = state_dict

    def _load_allocator_state(self, state: dict[str, Any]) -> None:
        assert self.allocator is not None
        self.allocator.load_state_dict(state["allocator"])
        self._last_global_step = state["last_global_step"]
        with torch.no_grad():
            for name, live in state["live_lora_E"].items():
                self._adapters[name].lora_E.copy_(live)
        if self.allocator.last_step is not None:
            self.budget = self.allocator.schedule.budget_at(self.allocator.last_step)
        self._restored = True

    # ------------------------------------------------------------------ teardown
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks = []
        self._trainer = None
