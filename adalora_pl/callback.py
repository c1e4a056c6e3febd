"""``AdaLoRACallback``: AdaLoRA for any LightningModule, with one line in the Trainer's callbacks.

The hooks and the order they run in are docs/method.md §6; what a project can rely on is the README's "AdaLoRA in
your own Lightning project". The settings are an :class:`~adalora_pl.config.AdaLoRAConfig`; the rank report written
at the end of fit is :func:`adalora_pl.io.report.write_rank_report`.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from adalora_pl.allocator import MaskEvent, RankAllocator, broadcast_keep_mask, optimizer_holding
from adalora_pl.config import AdaLoRAConfig
from adalora_pl.errors import ConfigError
from adalora_pl.gradient_start import base_weight_gradients, generated_losses, start_from_gradients
from adalora_pl.importance import add_orthogonal_regularizer_grad_
from adalora_pl.injection import find_adapters, inject_adapters, preset_targets
from adalora_pl.layers import SVDLinear, set_kernel
from adalora_pl.sharding import all_finite, global_offsets, local, masked_rows, shard_group, whole

# Sharding strategies the callback cannot run under: FSDP1 flattens parameters (the adapters' shapes are gone) and
# DeepSpeed owns the optimizer step. ModelParallelStrategy (FSDP2: DTensor parameters) is supported.
UNSUPPORTED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy)


def _grad_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The enabled GradScaler of a "16-mixed" run (None for other precisions)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _find_model_for_preset(module: torch.nn.Module) -> torch.nn.Module:
    """The first submodule carrying a transformers ``config`` (to look up target presets)."""
    return next((m for m in module.modules() if getattr(getattr(m, "config", None), "model_type", None)), module)


class _quiet_training_steps:
    """Inside the block the module's ``training_step`` can run outside the loop without leaving a trace: every
    submodule in eval mode (the gradient of the model, not of one dropout draw), ``log`` / ``log_dict`` no-ops
    (Lightning refuses logging from ``on_train_start``, and the values would enter the first epoch's averages), and
    the states of the module's torchmetrics metrics (a training accuracy updated in ``training_step``) and the
    submodules' modes put back on exit. Other side effects of ``training_step`` happen (README, "Faster-starting
    options")."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module

    def __enter__(self) -> None:
        from torchmetrics import Metric

        module = self.module
        self.modes = {m: m.training for m in module.modules()}
        self.metrics = [(m, copy.deepcopy(m.metric_state), m._update_count, m._computed)
                        for m in module.modules() if isinstance(m, Metric)]
        module.eval()
        module.log = module.log_dict = lambda *args, **kwargs: None

    def __exit__(self, *exc: Any) -> None:
        module = self.module
        del module.log, module.log_dict  # the class's methods again
        for m, training in self.modes.items():
            m.train(training)
        for metric, state, count, computed in self.metrics:
            for name, value in state.items():
                setattr(metric, name, value)
            metric._update_count, metric._computed = count, computed


class AdaLoRACallback(Callback):
    r"""Run AdaLoRA (Zhang et al., ICLR 2023) on a LightningModule: adapters, regularizer, pruning.

    ``setup`` injects SVD adapters (or adopts the module's own) before ``configure_optimizers``; ``on_fit_start``,
    when the module's datasets exist, fixes the schedule in optimizer steps; every optimizer step adds the
    orthogonal regularizer's gradient before clipping, updates the importance right after ``optimizer.step()``
    (an optimizer hook: manual optimization works whatever the order of ``step`` and ``zero_grad``) and masks to
    the budget at the end of the batch. A run too short for the schedule (``fast_dev_run``) trains without
    pruning after one warning. Checkpoints hold the masked singular values at zero and resume exactly; a resume
    with other settings is refused naming them. Without a GradScaler an inf/NaN gradient stops the fit (one host
    sync per step). The progress bar shows ``adalora/rank``, the triplets the last mask kept.

    Args:
        config: the settings; or give them as keyword arguments (``AdaLoRACallback(init_r=12, target_r=8)``).
        rank_pattern_file: file name of the rank pattern written into the log dir at the end of fit.
        **settings: fields of :class:`~adalora_pl.config.AdaLoRAConfig`, when ``config`` is not given.

    Example::

        trainer = Trainer(callbacks=[AdaLoRACallback(target_modules=["query", "value"], init_r=12,
                                                     target_r=8, tinit=0.1, tfinal=0.3)])
        trainer.fit(my_module)
    """

    # What the callback injects or adopts; subclasses for other prunable adapters change these.
    adapter_class: type = SVDLinear
    allocator_class: type[RankAllocator] = RankAllocator

    def __init__(self, config: AdaLoRAConfig | None = None, *, rank_pattern_file: str = "rank_pattern.json",
                 **settings: Any) -> None:
        if config is not None and settings:
            raise ConfigError(f"give AdaLoRACallback a config or settings, not both (settings {sorted(settings)})")
        self.config = config if config is not None else AdaLoRAConfig(**settings)
        if self.config.rank_pattern is not None:
            raise ConfigError(f"rank_pattern={self.config.rank_pattern!r} fixes LoRA ranks (method='lora' of the task "
                              f"modules); {type(self).__name__} allocates the ranks itself: leave rank_pattern None")
        self.rank_pattern_file = rank_pattern_file
        self.allocator: RankAllocator | None = None
        self.budget: int | None = None
        self._adapters: dict[str, torch.nn.Module] = {}
        self._last_global_step = 0
        self._pending_state: dict | None = None
        self._restored = False
        self._trainer: pl.Trainer | None = None
        self._step_hooks: list[Any] = []
        self._checked_params: list[torch.nn.Parameter] = []
        self._grad_group = None
        self._ranks_logged_at: int | None = None
        self._gradient_started = False

    # One key whatever the settings: a resume with changed settings must find the checkpoint's state to say what
    # changed, not silently start the averages from zero.
    @property
    def state_key(self) -> str:
        return type(self).__qualname__

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, UNSUPPORTED_STRATEGIES):
            raise RuntimeError(
                f"AdaLoRACallback does not support {type(trainer.strategy).__name__}: use ModelParallelStrategy "
                "(FSDP2, fully_shard) to shard the model, or strategy='ddp' when the model fits one device."
            )
        if is_overridden("configure_model", pl_module, pl.LightningModule):
            # Lightning calls configure_model after the callbacks' setup, but the adapters must be in before the
            # optimizer is built: build the model now, in Lightning's contexts (the hook must be idempotent).
            with (trainer.strategy.tensor_init_context(), trainer.strategy.model_sharded_context(),
                  trainer.precision_plugin.module_init_context()):
                pl_module.configure_model()
        if next(pl_module.parameters(), None) is None:
            raise ConfigError(
                f"AdaLoRACallback found no parameters in {type(pl_module).__name__} at setup: Lightning calls the "
                "callbacks' setup before the module's own setup, and the adapters must exist before "
                "configure_optimizers. Build the model in __init__ or in configure_model."
            )
        self._adapters = self._inject_or_adopt(pl_module)
        if self.config.adapter_init == "gradient_svd" and stage == "fit":
            self._check_gradient_start(trainer, pl_module)

    def _check_gradient_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse, before anything trains, a fit where the gradient-SVD start cannot run."""
        if not pl_module.automatic_optimization:
            raise ConfigError(
                f"adapter_init='gradient_svd' takes its gradient from {type(pl_module).__name__}.training_step, which "
                "under manual optimization would step the optimizer itself; use another adapter_init, or call "
                "adalora_pl.gradient_start.start_from_gradients yourself"
            )
        if isinstance(trainer.strategy, ModelParallelStrategy):
            raise ConfigError("adapter_init='gradient_svd' is not supported under ModelParallelStrategy (sharded base "
                              "weights); use another adapter_init, or DDP")
        others = [name for name, layer in self._adapters.items() if not isinstance(layer, SVDLinear)]
        if others:
            raise ConfigError(f"adapter_init='gradient_svd' starts SVD adapters; {others[0]} is a "
                              f"{type(self._adapters[others[0]]).__name__}")

    def _inject_or_adopt(self, pl_module: pl.LightningModule) -> dict[str, torch.nn.Module]:
        """The module's adapters: the ones it has, or new ones injected into the target layers."""
        adapters, c = find_adapters(pl_module), self.config
        if adapters:
            others = [n for n, m in adapters.items() if not isinstance(m, self.adapter_class)]
            if others:
                raise TypeError(
                    f"{type(self).__name__} needs {self.adapter_class.__name__} adapters; the module has other "
                    f"adapter layers ({others[:3]}...). Remove the callback for a plain LoRA or adapter run."
                )
            rank_zero_info(f"AdaLoRA: adopting the {len(adapters)} adapters the module already has")
            if c.kernel != "reference":  # the default leaves the layers' own setting alone
                set_kernel(adapters.values(), c.kernel)
            return adapters
        targets = c.target_modules or preset_targets(_find_model_for_preset(pl_module), c.trainable_modules)
        # Only the options that differ from the layer's defaults: a subclass's adapter class may not take them.
        options = {k: v for k, v, default in (("adapter_init", c.adapter_init, "reference"),
                                              ("scaling", c.scaling, "alpha_over_r")) if v != default}
        adapters = inject_adapters(pl_module, targets, method=self.adapter_class, r=c.init_r, lora_alpha=c.lora_alpha,
                                   lora_dropout=c.lora_dropout, trainable_modules=c.trainable_modules,
                                   autocast_adapter_dtype=c.autocast_adapter_dtype, **options)
        rank_zero_info(f"AdaLoRA: injected {len(adapters)} {self.adapter_class.__name__} adapters (init_r={c.init_r})")
        if c.kernel != "reference":
            set_kernel(adapters.values(), c.kernel)
        return adapters

    # ------------------------------------------------------------------ start of fit
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        current = find_adapters(pl_module)
        if any(current.get(name) is not layer for name, layer in self._adapters.items()):
            raise RuntimeError(
                f"the adapters injected at setup are no longer in {type(pl_module).__name__}: its configure_model "
                "rebuilt the model. Make configure_model idempotent (build the model only if it does not exist yet)."
            )
        # The module's setup has run and the strategy has built the optimizer: the number of steps is known now.
        resolved = self.config.resolved(self.config.total_step or self._estimated_total_steps(trainer))
        pending, self._pending_state = self._pending_state, None
        if pending is not None:
            resolved.check_resume(pending["settings"])
        problem = f"fast_dev_run={trainer.fast_dev_run}" if trainer.fast_dev_run else resolved.schedule_gap()
        if problem is not None:
            rank_zero_warn(f"AdaLoRA: {problem}: this fit trains the adapters at init_r={resolved.init_r} without "
                           "pruning (no importance, no masks, no rank pattern written)")
        else:
            self._build_allocator(resolved, trainer)
            if pending is not None:
                self._load_allocator_state(pending)
            holder = optimizer_holding(self.allocator.params, trainer.optimizers)
            self._step_hooks = [holder.register_step_post_hook(self._after_optimizer_step)]
        self._trainer = trainer
        self._checked_params = [p for p in pl_module.parameters() if p.requires_grad]
        self._grad_group = shard_group(self._checked_params)

    @staticmethod
    def _estimated_total_steps(trainer: pl.Trainer) -> int:
        try:
            estimated = trainer.estimated_stepping_batches
        except Exception as err:  # a dataloader that cannot be built: say what the callback needed it for
            raise RuntimeError(f"AdaLoRACallback could not read the number of optimizer steps from the Trainer "
                               f"({type(err).__name__}: {err}); pass total_step= or fix the train dataloader") from err
        if not math.isfinite(estimated):
            raise ConfigError("the number of optimizer steps is unbounded (max_steps=-1 and max_epochs=-1, or an "
                              "iterable dataset without length); AdaLoRA's schedule needs total_step= or a finite run")
        return int(estimated)

    def _build_allocator(self, resolved: AdaLoRAConfig, trainer: pl.Trainer) -> None:
        # Under DDP every rank computes the same mask from all-reduced gradients; the broadcast from rank 0 (at mask
        # events only) makes that a guarantee rather than an assumption.
        self.allocator = self.allocator_class(
            self._adapters, target_r=resolved.target_r, tinit=resolved.tinit, tfinal=resolved.tfinal,
            total_step=resolved.total_step, delta_t=resolved.delta_t, beta1=resolved.beta1, beta2=resolved.beta2,
            importance=resolved.importance, sync_keep=broadcast_keep_mask if trainer.world_size > 1 else None,
        )
        self._resolved = resolved
        self.budget = self.allocator.schedule.budget_at(0)
        rank_zero_info(f"AdaLoRA schedule: {self.allocator.schedule.describe()}; {len(self._adapters)} adapters, "
                       f"importance={resolved.importance}, orth_reg_weight={resolved.orth_reg_weight}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The loops' progress is restored after on_fit_start: only now does global_step say whether this resumes.
        if self.allocator is not None and trainer.global_step > 0 and not self._restored:
            rank_zero_warn(f"AdaLoRA: resuming at optimizer step {trainer.global_step} from a checkpoint without "
                           "AdaLoRA state (saved without this callback): the importance averages start from zero here")
        self._last_global_step = trainer.global_step
        if (self.config.adapter_init == "gradient_svd" and trainer.global_step == 0 and not self._restored
                and not self._gradient_started):
            self._start_from_gradients(trainer, pl_module)

    def _start_from_gradients(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The gradient-SVD start: the loss gradients of the adapted base weights over the first
        ``gradient_init_batches`` training batches (the module's own ``training_step`` inside
        :class:`_quiet_training_steps`; all-reduced across ranks), then A and B from their singular vectors
        (docs/method.md §13).

        Here, not at setup: the strategy has moved and wrapped the module, the train dataloader exists, and a
        resumed fit (whose A and B come from its checkpoint) is known."""
        from lightning.pytorch.utilities import CombinedLoader

        limit = self.config.gradient_init_batches
        batches = CombinedLoader(trainer.train_dataloader, mode="max_size_cycle")
        # Under 16-mixed the float16 activations' gradients need a scaled loss not to underflow; not the GradScaler's
        # own scale (65536 at the start, which it then backs off from by skipping steps: an overflow here would
        # stop the start), a fixed 1024, far from float16's limits for a loss of order 1.
        loss_scale = 1024.0 if _grad_scaler(trainer) is not None else 1.0

        def loss_of(item: Any, index: int) -> torch.Tensor | None:
            batch, batch_idx, _ = item
            batch = trainer.strategy.batch_to_device(batch)
            with trainer.precision_plugin.train_step_context():
                out = pl_module.training_step(batch, batch_idx)
            return out["loss"] if isinstance(out, dict) else out

        with _quiet_training_steps(pl_module):
            gradients, count = base_weight_gradients(
                pl_module, self._adapters, generated_losses(batches, loss_of, limit), loss_scale)
        if trainer.world_size > 1:
            gradients = {name: trainer.strategy.reduce(g, reduce_op="mean") for name, g in gradients.items()}
        captured = start_from_gradients(self._adapters, gradients)
        self._gradient_started = True
        rank_zero_info(f"AdaLoRA: gradient-SVD start: A and B of {len(self._adapters)} adapters set to the top "
                       f"{self.config.init_r} singular vectors of their base weights' loss gradient over {count} "
                       f"batch{'es' if count != 1 else ''}{'' if count == limit else f' (the loader has {count})'}, "
                       f"holding {100 * captured:.1f}% of its squared norm on average; E = 0")

    # ------------------------------------------------------------------ per step
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
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
        if self.config.orth_reg_weight > 0 and isinstance(layers[0], SVDLinear):
            reg = add_orthogonal_regularizer_grad_([(m.lora_A, m.lora_B) for m in layers], self.config.orth_reg_weight)
            pl_module.log("adalora/orth_reg", reg, on_step=True, on_epoch=False)
        if scaler is None:
            self._stop_on_nonfinite_gradients(trainer)

    def _stop_on_nonfinite_gradients(self, trainer: pl.Trainer) -> None:
        """Raise before the optimizer writes an inf/NaN gradient into the parameters (no GradScaler to skip it)."""
        if not all_finite([p.grad for p in self._checked_params if p.grad is not None], self._grad_group):
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
        # Lightning counts the step as completed after optimizer.step() returns: global_step is this step's index.
        if allocator is None or trainer is None or trainer.global_step >= allocator.schedule.final_step:
            return
        found_inf = getattr(optimizer, "found_inf", None)  # set by GradScaler.step() for optimizers that unscale
        # themselves, which skip the update internally when it is nonzero
        allocator.update_importance(found_inf == 0 if isinstance(found_inf, torch.Tensor) else None)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
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
        if trainer.logger is None or not trainer.is_global_zero:
            return
        last, final = self._ranks_logged_at, event.step == self.allocator.schedule.final_step
        if not final and last is not None and event.step - last < max(1, trainer.log_every_n_steps):
            return
        self._ranks_logged_at = event.step
        ranks = self.allocator.kept_ranks()
        metrics = {"adalora/total_rank": float(sum(ranks.values())),
                   "adalora/mask_threshold": float(event.threshold) if event.threshold is not None else 0.0}
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
            self._write_report(trainer.log_dir or trainer.default_root_dir, trainer.logger)
        finally:
            # Ranks leave fit together, also when rank zero failed to write: a gloo worker that exits while rank
            # zero still writes can abort in its process-group teardown, and a rank left alone would hang.
            trainer.strategy.barrier("adalora_rank_pattern")

    @rank_zero_only
    def _write_report(self, directory: str, logger: Any) -> None:
        from adalora_pl.io.report import write_rank_report

        path = write_rank_report(self.allocator, directory, self.rank_pattern_file, logger)
        rank_zero_info(f"AdaLoRA: final total rank {int(self.allocator.kept_total())}; rank pattern written to {path}")

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        if self.allocator is None:
            return {}
        return {
            "settings": self._resolved.to_dict(),
            "allocator": self.allocator.state_dict(),
            "last_global_step": self._last_global_step,
            # The checkpoint's state_dict has masked singular values zeroed (see on_save_checkpoint); the live
            # values, which may still come back at the next mask event, resume from here.
            "live_lora_E": {name: whole(layer.lora_E.detach()) for name, layer in self._adapters.items()
                            if isinstance(layer, SVDLinear)},
        }

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Every checkpoint holds the ranks the run reports (the last mask), also one written between mask events:
        # evaluation, export and `validate --ckpt_path` read these weights.
        state = checkpoint.get("state_dict")
        if self.allocator is None or state is None:
            return
        for name, layer in self._adapters.items():
            key = f"{name}.lora_E"
            if isinstance(layer, SVDLinear) and key in state:
                state[key] = masked_rows(state[key], layer.rank_mask)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.allocator is None:
            # Lightning restores callbacks before the strategy sets up and before on_fit_start knows the number of
            # steps: the state is checked against this run's settings and applied there.
            self._pending_state = state_dict
            return
        # ModelParallelStrategy restores after on_fit_start, once the model is sharded.
        self._resolved.check_resume(state_dict["settings"])
        self._load_allocator_state(state_dict)

    def _load_allocator_state(self, state: dict[str, Any]) -> None:
        self.allocator.load_state_dict(state["allocator"])
        self._last_global_step = state["last_global_step"]
        with torch.no_grad():
            for name, live in state["live_lora_E"].items():
                E = self._adapters[name].lora_E
                row = global_offsets(E)[0]
                local(E).copy_(live[row:row + local(E).shape[0]])
        if self.allocator.last_step is not None:
            self.budget = self.allocator.schedule.budget_at(self.allocator.last_step)
        self._restored = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks, self._trainer = [], None
