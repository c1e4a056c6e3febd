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
from adalora_pl.importance import Importance, orthogonal_regularizer, validate_importance
from adalora_pl.injection import DEFAULT_TRAINABLE_MODULES, find_adapters, inject_adapters, preset_targets
from adalora_pl.layers import ADAPTER_INITS, AdapterInit, SVDLinear
from adalora_pl.schedule import resolve_steps, validate_betas, validate_ranks

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
    """The GradScaler of a "16-mixed" run (None for other precisions)."""
    return getattr(trainer.precision_plugin, "scaler", None)


def _current_scale(scaler: torch.amp.GradScaler) -> torch.Tensor:
    """The loss scale as a 0-dim tensor; the live ``_scale`` tensor avoids the host sync of ``get_scale()``."""
    scale = getattr(scaler, "_scale", None)
    return scale.detach().clone() if isinstance(scale, torch.Tensor) else torch.tensor(scaler.get_scale())


class AdaLoRACallback(Callback):
    r"""Run AdaLoRA (Zhang et al., ICLR 2023) on a LightningModule: adapters, regularizer, pruning.

    At ``setup`` the callback injects SVD adapters into the module (or adopts the ones it already has),
    freezes everything else except the ``trainable_modules``, and fixes the schedule in optimizer steps.
    At every optimizer step it adds the orthogonal regularizer's gradient, updates the importance
    averages from the gradients just applied, and masks singular values to the current budget
    (the call order of the reference training loop, docs/method.md §6).

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
        total_step: total optimizer steps T. Default: ``trainer.estimated_stepping_batches``.
        rank_pattern_file: file name written into the log dir at the end of fit.
        autocast_adapter_dtype: adapters of a float16/bfloat16 model are kept in float32 (default, as PEFT),
            also when a "bf16-true"/"16-true" Trainer converts the module. False: the model's dtype.
        adapter_init: initialization of injected adapters: ``"reference"`` (the authors' and PEFT's) or
            ``"orthogonal"`` (see :class:`~adalora_pl.layers.SVDLinear`).

    Adapters are injected (or adopted) for every stage, so ``trainer.validate/test/predict(module,
    ckpt_path=...)`` restore a checkpoint of a fit with the callback; the allocator exists only for fit.
    Under "16-mixed" the regularizer and the importance see unscaled gradients with every optimizer
    (the callback unscales for optimizers that would unscale inside their own step, such as fused AdamW),
    and a step the GradScaler skips leaves the importance averages unchanged. At the end of training the
    masked triplets are zeroed, so the returned model has exactly the ranks of ``rank_pattern.json``.
    A module that builds its model in ``configure_model`` gets it called once earlier, inside the same
    contexts as Lightning's call; like Lightning, the callback expects that hook to be idempotent.

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
            raise ValueError(f"adapter_init must be one of {list(ADAPTER_INITS)}, got {adapter_init!r}")
        validate_betas(beta1, beta2)
        validate_importance(importance)
        if orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {orth_reg_weight}")
        if not isinstance(delta_t, int) or delta_t < 1:
            raise ValueError(f"delta_t must be an integer >= 1, got {delta_t!r}")
        if total_step is not None and (not isinstance(total_step, int) or total_step <= 0):
            raise ValueError(f"total_step must be a positive integer or None, got {total_step!r}")
        for name, value in (("tinit", tinit), ("tfinal", tfinal)):
            resolve_steps(name, value, total_step or 1_000_000)
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
        self._scale_before_step: torch.Tensor | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(target_r=self.target_r, importance=self.importance)

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._refuse_unsupported_strategy(trainer)
        self._build_model_first(trainer, pl_module)
        self._adapters = self._inject_or_adopt(pl_module)
        if stage != "fit":
            return  # validate/test/predict: the adapters must exist to load a checkpoint, nothing is allocated
        total_step = self.total_step or self._estimated_total_steps(trainer)
        self._build_allocator(self._adapters, total_step, trainer)
        if self._pending_state is not None:
            self._load_allocator_state(self._pending_state, trainer)
            self._pending_state = None

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
        except Exception as err:  # the data may not be reachable this early in some projects
            raise RuntimeError(
                "AdaLoRACallback could not estimate the number of optimizer steps; pass total_step="
            ) from err
        if not math.isfinite(estimated):
            raise ValueError(
                "the number of optimizer steps is unbounded (max_steps=-1 and max_epochs=-1, or an iterable "
                "dataset without length); AdaLoRA's schedule needs total_step= or a finite run"
            )
        return int(estimated)

    def _build_allocator(self, adapters: dict[str, SVDLinear], total_step: int, trainer: pl.Trainer) -> None:
        tinit = resolve_steps("tinit", self.tinit, total_step)
        tfinal = resolve_steps("tfinal", self.tfinal, total_step)
        sync = broadcast_keep_mask if trainer.world_size > 1 else None
        self.allocator = self._new_allocator(adapters, tinit, tfinal, total_step, self.delta_t, sync)

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

    # ------------------------------------------------------------------ per step
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        current = find_adapters(pl_module)
        if any(current.get(name) is not layer for name, layer in self._adapters.items()):
            raise RuntimeError(
                f"the adapters injected at setup are no longer in {type(pl_module).__name__}: its configure_model "
                "rebuilt the model. Make configure_model idempotent (build the model only if it does not exist yet)."
            )
        # A "bf16-true"/"16-true" Trainer converted the whole module after setup; adapters go back to float32
        # before the first optimizer step creates their state.
        upcast = [name for name, layer in self._adapters.items() if layer.restore_adapter_dtype()]
        if upcast:
            rank_zero_info(f"AdaLoRA: {len(upcast)} adapters kept in float32 (autocast_adapter_dtype=True)")
        scaler = _grad_scaler(trainer)
        if scaler is not None and scaler.is_enabled() and not scaler.get_backoff_factor() < 1.0:
            raise ValueError("AdaLoRACallback detects skipped fp16 steps by a falling loss scale: the GradScaler's "
                             f"backoff_factor must be < 1, got {scaler.get_backoff_factor()}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_global_step = trainer.global_step

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Gradients are complete here (all micro-batches, all-reduced) and clipping has not run yet, so the
        # regularizer enters exactly as in loss + w * R.
        self._scale_before_step = None
        if self.allocator is None:
            return
        params = self.allocator.params
        if all(p.grad is None for p in params):
            return  # the training step was skipped: nothing to regularize or unscale
        scaler = _grad_scaler(trainer)
        if scaler is not None and scaler.is_enabled():
            if getattr(optimizer, "_step_supports_amp_scaling", False):
                # Lightning leaves unscaling to such optimizers' own step (fused AdamW); the regularizer and the
                # importance need true gradients. scaler.step() then knows they are unscaled already.
                scaler.unscale_(optimizer)
            self._scale_before_step = _current_scale(scaler)
        if self.orth_reg_weight == 0 or not isinstance(self.allocator.layers[0], SVDLinear):
            return  # the regularizer applies to singular vectors, not to LoRA factors
        factors = [(m.lora_A, m.lora_B) for m in self.allocator.layers]
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

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.allocator is None or trainer.global_step == self._last_global_step:
            return  # accumulating gradients: no optimizer step on this batch
        step = trainer.global_step - 1  # 0-based index of the optimizer step just taken
        self._last_global_step = trainer.global_step
        applied = None
        scaler = _grad_scaler(trainer)
        if self._scale_before_step is not None and scaler is not None:
            # GradScaler.update() lowers the scale exactly when it skipped the step (inf/NaN in any gradient).
            applied = _current_scale(scaler).to(self._scale_before_step.device) >= self._scale_before_step
        event = self.allocator.update_and_allocate(step, applied)
        if step == self.allocator.schedule.total_step - 1:
            # Between mask events a masked triplet keeps training (it may come back at the next event); with
            # tfinal = 0 the last event may lie steps before the end. The last step leaves the ranks of the last
            # mask, before any end-of-training checkpoint is written, as rank_pattern.json and exports say.
            self.allocator.apply_rank_pattern()
        self.budget = event.budget
        pl_module.log("adalora/budget", float(event.budget), on_step=True, on_epoch=False, prog_bar=True)
        if event.masked:
            self._log_mask_event(trainer, event)

    def _log_mask_event(self, trainer: pl.Trainer, event: MaskEvent) -> None:
        assert self.allocator is not None
        ranks = self.allocator.kept_ranks()
        if trainer.logger is None or not trainer.is_global_zero:
            return
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
        return {
            "allocator": self.allocator.state_dict(),
            "schedule": {"tinit": s.tinit, "tfinal": s.tfinal, "total_step": s.total_step, "delta_t": s.delta_t},
            "last_global_step": self._last_global_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.allocator is None:
            self._pending_state = state_dict  # restored before setup: apply once the adapters exist
            return
        self._load_allocator_state(state_dict, None)

    def _load_allocator_state(self, state: dict[str, Any], trainer: pl.Trainer | None) -> None:
        assert self.allocator is not None
        saved = state["schedule"]
        s = self.allocator.schedule
        if (saved["tinit"], saved["tfinal"], saved["total_step"], saved["delta_t"]) != (
            s.tinit, s.tfinal, s.total_step, s.delta_t,
        ):
            log.warning(
                "AdaLoRA: the checkpoint's schedule %s differs from this run's (tinit=%d, tfinal=%d, total_step=%d, "
                "delta_t=%d); continuing with the checkpoint's schedule so the resumed run stays consistent",
                saved, s.tinit, s.tfinal, s.total_step, s.delta_t,
            )
            self.tinit, self.tfinal, self.delta_t = saved["tinit"], saved["tfinal"], saved["delta_t"]
            adapters = dict(zip(self.allocator.names, self.allocator.layers, strict=True))
            self.allocator = self._new_allocator(
                adapters, saved["tinit"], saved["tfinal"], saved["total_step"], saved["delta_t"],
                self.allocator.sync_keep,
            )
        self.allocator.load_state_dict(state["allocator"])
        self._last_global_step = state["last_global_step"]
        if self.allocator.last_step is not None:
            self.budget = self.allocator.schedule.budget_at(self.allocator.last_step)
