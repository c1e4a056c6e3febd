"""The base of the task modules: backbone, method switch, adapters, optimizer and schedule.

The module owns the adapters; :class:`~adalora_pl.callback.AdaLoRACallback` runs the schedule. A module
built with ``method="adalora"`` supplies that callback itself (``configure_callbacks``), so it can never
train with adapters whose budget is not being allocated.

What the task modules (GLUE, SQuAD, summarization) share lives here too: loading the backbone through a transformers
Auto class (``auto_class``), ``forward``, the training step, and the evaluation loop's skeleton: ``validation_step``
and ``test_step`` call the task's ``eval_step``, each epoch starts and ends with every torchmetrics ``Metric`` of the
module reset, and ends by logging the task's ``log_eval_metrics``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import Metric

from adalora_pl.baselines import ADAPTER_CLASSES, PruneLoRACallback, bottleneck_targets, linear_shapes, match_budget
from adalora_pl.callback import AdaLoRACallback
from adalora_pl.config import AdaLoRAConfig, Method, method_overrides, method_spec
from adalora_pl.errors import ConfigError
from adalora_pl.injection import count_adapter_parameters, inject_adapters, name_matches, preset_targets
from adalora_pl.io.pretrained import check_backbone, load_pretrained
from adalora_pl.schedule import resolve_steps

log = logging.getLogger(__name__)

# Key under which a task module records its class path in checkpoints (for ``cli.py export``).
MODULE_CLASS_KEY = "adalora_pl_module_class"
# Key under which a task module records its AdaLoRAConfig (as JSON types) in checkpoints.
CONFIG_KEY = "adalora_config"
# The evaluation stages, as they prefix the logged names ("val/f1").
Stage = Literal["val", "test"]
# Names transformers gives the learned absolute position embeddings: BERT, RoBERTa, MPNet, ELECTRA, DeBERTa with
# position_biased_input (``position_embeddings``), BART (``embed_positions``), GPT-2 (``wpe``).
ABSOLUTE_POSITION_MODULES = ("position_embeddings", "embed_positions", "wpe")


def max_input_positions(model: nn.Module) -> int | None:
    """The most tokens ``model`` takes in one sequence, from its learned absolute position embeddings, or None when
    it has none (only relative or rotary positions: DeBERTa-v3 with ``position_biased_input=False``, T5, Llama).

    That is ``max_position_embeddings`` for BERT, GPT-2 and BART (whose table has two more rows, its ``offset``), and
    ``max_position_embeddings - pad_token_id - 1`` for RoBERTa and MPNet, whose positions start after the padding
    index. With several tables (an encoder-decoder) the smallest limit counts.
    """
    limits = []
    for name, module in model.named_modules():
        if name.rpartition(".")[2] not in ABSOLUTE_POSITION_MODULES or not isinstance(module, nn.Embedding):
            continue
        offset = getattr(module, "offset", None)
        if not isinstance(offset, int):
            offset = module.padding_idx + 1 if module.padding_idx is not None else 0
        limits.append(module.num_embeddings - offset)
    return min(limits) if limits else None


class AdapterModule(pl.LightningModule):
    """Base for task modules: builds the backbone, adds adapters per ``method``, sets up AdamW.

    Args:
        backbone: hub name or local folder of a pretrained transformers model.
        method: ``"adalora"`` (SVD adapters + AdaLoRACallback), ``"lora"`` (uniform-rank LoRA with
            r = ``init_r``), ``"full"`` (full fine-tuning, no adapters), ``"houlsby"`` / ``"pfeiffer"``
            (bottleneck adapters after attention and FFN / after FFN), or the ablations ``"svd_lora"`` (SVD
            adapters, no budget allocation) and ``"prune_lora"`` (LoRA doublets pruned on AdaLoRA's schedule,
            without recovery). AdaLoRA without the regularizer: ``orth_reg_weight=0``; importance variants:
            ``importance``.
        learning_rate: AdamW learning rate of the adapters (of everything for ``full``).
        head_learning_rate: learning rate of the trained heads; default ``learning_rate``.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up, in steps (int) or as a fraction of training (float in (0, 1));
            then a linear decay to 0.
        bottleneck_size: bottleneck width of ``houlsby``/``pfeiffer`` adapters.
        param_budget: target #Params (adapter parameters, heads excluded); when given, the LoRA rank or the
            bottleneck size is chosen to match it (:func:`adalora_pl.baselines.match_budget`).
        **adalora: the fields of :class:`~adalora_pl.config.AdaLoRAConfig` (``init_r``, ``target_r``,
            ``target_modules``, ``trainable_modules``, ``tinit``, ...; ``init_r`` is LoRA's rank for ``lora``). On the
            command line each is a module option (``--model.init_r``). A ``trainable_modules`` name that matches no
            module is refused, unless it is one of the known head names that some model families lack by design.

    A task module sets :attr:`auto_class` (and, if its evaluation batches carry them, :attr:`bookkeeping_keys`) and
    implements :meth:`eval_step` and :meth:`log_eval_metrics`. A task module that overrides :meth:`setup` calls
    ``super().setup(stage)``, which checks the data module's lengths against the backbone.

    Raises:
        ConfigError: an unknown ``method``, a learning rate that is not > 0, a ``param_budget`` that is not a
            positive integer, ``adapter_init`` on a method without SVD adapters, or a ``trainable_modules`` name that
            matches nothing; the message names the argument and the value.
    """

    #: The transformers Auto class whose ``from_pretrained`` loads the backbone, e.g.
    #: ``AutoModelForQuestionAnswering``; see :meth:`build_backbone`.
    auto_class: ClassVar[Any] = None
    #: Keys of evaluation batches that the evaluation reads but the model does not take (``feature_index``);
    #: :meth:`model_inputs` drops them.
    bookkeeping_keys: ClassVar[tuple[str, ...]] = ()
    #: Data module attributes that set how many tokens enter the backbone in one sequence; :meth:`setup` checks them
    #: against :func:`max_input_positions`.
    data_length_options: ClassVar[tuple[str, ...]] = ("max_seq_length",)

    def __init__(
        self,
        backbone: str,
        method: Method = "adalora",
        learning_rate: float = 5e-4,
        head_learning_rate: float | None = None,
        weight_decay: float = 0.0,
        warmup_steps: int | float = 0,
        bottleneck_size: int = 64,
        param_budget: int | None = None,
        **adalora: Any,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # collects the subclass's init arguments too (task_name, ...)
        spec = method_spec(method)
        # The settings as the method runs them (svd_lora: a constant budget; prune_lora: no regularizer).
        adalora = {**adalora, **method_overrides(method, adalora)}
        # A plain AdaLoRAConfig(**adalora) call: LightningCLI reads the module's options through it.
        self.adalora = AdaLoRAConfig(**adalora)
        self.hparams.update(self.adalora.to_dict())  # checkpoints carry every setting, defaults too
        if not learning_rate > 0:  # also refuses nan
            raise ConfigError(f"learning_rate must be > 0, got {learning_rate!r}")
        if head_learning_rate is not None and not head_learning_rate > 0:
            raise ConfigError(
                f"head_learning_rate must be > 0 (or None: the learning_rate), got {head_learning_rate!r}"
            )
        if param_budget is not None and (isinstance(param_budget, bool) or not isinstance(param_budget, int)
                                         or param_budget <= 0):
            raise ConfigError(f"param_budget must be a positive integer (a #Params), got {param_budget!r}")
        resolve_steps("warmup_steps", warmup_steps, self.adalora.total_step or 1_000_000)  # checks the value now
        if self.adalora.adapter_init != "reference" and spec.adapter != "adalora":
            raise ConfigError(f"adapter_init={self.adalora.adapter_init!r} applies to SVD adapters (adalora, "
                              f"svd_lora), not to method={method!r}")
        self.backbone_name = backbone
        self.method = method
        # from_pretrained returns a model in eval mode; Lightning keeps module modes as they are.
        self.model = self.build_backbone(backbone).train()
        self.adapters: dict[str, nn.Module] = {}
        # configure_callbacks hands this one instance to the Trainer.
        callback_class = PruneLoRACallback if spec.adapter == "prune_lora" else AdaLoRACallback
        self.schedule_callback = callback_class(self.adalora) if spec.scheduled else None
        if spec.adapter is None:  # full fine-tuning
            self.model.requires_grad_(True)
            return
        c = self.adalora
        if spec.adapter == "bottleneck":
            targets, r = bottleneck_targets(self.model, method), bottleneck_size
        else:
            targets = list(c.target_modules) if c.target_modules else preset_targets(self.model, c.trainable_modules)
            r = c.init_r
        if param_budget is not None:
            shapes = linear_shapes(self.model, [n for n, _ in self.model.named_modules()
                                                if any(name_matches(n, t) for t in targets)])
            r, actual = match_budget(shapes, spec.budget, param_budget)
            log.info("param_budget %d -> r/bottleneck %d (%d params)", param_budget, r, actual)
        svd_options = {"adapter_init": c.adapter_init} if spec.adapter == "adalora" else {}
        self.adapters = inject_adapters(
            self.model, targets, method=ADAPTER_CLASSES[spec.adapter], r=r, lora_alpha=c.lora_alpha,
            lora_dropout=c.lora_dropout, trainable_modules=c.trainable_modules,
            autocast_adapter_dtype=c.autocast_adapter_dtype, **svd_options,
        )

    # ------------------------------------------------------------------ the backbone

    def build_backbone(self, backbone: str) -> nn.Module:
        """The pretrained transformers model: ``auto_class.from_pretrained(backbone, **backbone_kwargs(...))``.

        Called once, by ``__init__``, before the adapters are added. A mistyped folder or a hub id that cannot be
        reached raises :class:`~adalora_pl.io.pretrained.LoadError` with a one-line message.
        """
        if self.auto_class is None:
            raise NotImplementedError(f"{type(self).__name__} sets no auto_class and does not build its backbone")
        # check_backbone first: transformers reads any non-folder as a hub id ("Repo id must use alphanumeric chars")
        name = check_backbone(backbone)
        return load_pretrained(self.auto_class.from_pretrained, name, **self.backbone_kwargs(name))

    def backbone_kwargs(self, backbone: str) -> dict[str, Any]:
        """Keyword arguments of ``from_pretrained`` besides the name (none here; GLUE passes its label config).

        Args:
            backbone: the checked name (a hub id, or a folder with ``~`` expanded).
        """
        return {}

    def forward(self, **batch: torch.Tensor) -> Any:
        """The backbone's output (a transformers ``ModelOutput``) for a batch of its inputs."""
        return self.model(**batch)

    def model_inputs(self, batch: Mapping[str, torch.Tensor], drop: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """``batch`` without the :attr:`bookkeeping_keys` and ``drop`` (labels, where no loss is wanted)."""
        skip = {*self.bookkeeping_keys, *drop}
        return {k: v for k, v in batch.items() if k not in skip}

    @property
    def trainer_datamodule(self) -> Any | None:
        """The data module given to the Trainer, or ``None`` (no Trainer attached, or no data module)."""
        # self.trainer raises when no Trainer is attached (a module used on its own, e.g. for predict_step).
        return getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

    def require_datamodule(self, attribute: str, use: str, provider: str) -> Any:
        """The Trainer's data module, which must have ``attribute``; otherwise a RuntimeError that says which.

        Args:
            attribute: what the task reads from the data module (``compute_metrics``).
            use: the message's verb phrase, e.g. ``"scores answers through"``.
            provider: the data module class that has it, for the message.
        """
        datamodule = self.trainer_datamodule
        if datamodule is None or not hasattr(datamodule, attribute):
            raise RuntimeError(
                f"{type(self).__name__} {use} its data module's {attribute} ({provider}); "
                "pass it as `datamodule=` to the Trainer"
            )
        return datamodule

    def setup(self, stage: str) -> None:
        """Check the data module's lengths against the backbone (see :meth:`check_data_lengths`)."""
        self.check_data_lengths()

    def check_data_lengths(self) -> None:
        """Refuse a data module length (:attr:`data_length_options`) above the backbone's absolute positions.

        Too long a sequence would otherwise fail deep in the embeddings, possibly many steps in (only once a batch is
        that long). Backbones without absolute positions (:func:`max_input_positions` is None) take any length.

        Raises:
            ConfigError: naming ``--data.<option>``, its value and the backbone's maximum.
        """
        datamodule = self.trainer_datamodule
        limit = max_input_positions(self.model) if datamodule is not None else None
        if limit is None:
            return
        for option in self.data_length_options:
            value = getattr(datamodule, option, None)
            if isinstance(value, int) and value > limit:
                raise ConfigError(
                    f"--data.{option} {value} exceeds the {limit} positions of the backbone {self.backbone_name!r} "
                    f"({type(self.model).__name__} has learned absolute positions); set it to at most {limit}"
                )

    # ------------------------------------------------------------------ training and evaluation

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The backbone's own loss on the batch's labels (cross-entropy, MSE for regression), logged as
        ``train/loss``."""
        loss = self(**batch).loss
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def eval_step(self, batch: dict[str, torch.Tensor], stage: Stage, dataloader_idx: int = 0) -> None:
        """One validation or test batch: log its loss if wanted and update the task's metrics."""
        raise NotImplementedError

    def log_eval_metrics(self, stage: Stage) -> None:
        """Compute the task's metrics over the epoch's batches and log them as ``{stage}/{name}``; the base resets
        every metric afterwards."""
        raise NotImplementedError

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """See :meth:`eval_step`."""
        self.eval_step(batch, "val", dataloader_idx)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """See :meth:`eval_step`."""
        self.eval_step(batch, "test", dataloader_idx)

    def reset_metrics(self) -> None:
        """Empty the states of every torchmetrics ``Metric`` of the module."""
        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()

    # An epoch stopped half way (an exception in a validate call, an interrupted sanity check) leaves states behind:
    # reset at the start too, not only after logging.
    def on_validation_epoch_start(self) -> None:
        self.reset_metrics()

    def on_test_epoch_start(self) -> None:
        self.reset_metrics()

    def on_validation_epoch_end(self) -> None:
        self.log_eval_metrics("val")
        self.reset_metrics()

    def on_test_epoch_end(self) -> None:
        self.log_eval_metrics("test")
        self.reset_metrics()

    # ------------------------------------------------------------------ adapters, schedule, optimizer

    def configure_callbacks(self) -> list[pl.Callback]:
        # Adapters with a schedule never train without it: the module brings its callback along.
        return [self.schedule_callback] if self.schedule_callback is not None else []

    def adapter_param_count(self) -> int:
        """#Params as the paper reports it (adapter parameters, kept ranks only; heads excluded)."""
        return count_adapter_parameters(self.model, kept_only=True)

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        adapter_params, head_params = [], []
        adapter_ids = {id(p) for m in self.adapters.values() for n, p in m.named_parameters()
                       if not n.startswith("base_layer.")}
        for p in self.parameters():
            if p.requires_grad:
                (adapter_params if id(p) in adapter_ids or self.method == "full" else head_params).append(p)
        groups = [{"params": adapter_params, "lr": h.learning_rate}]
        if head_params:
            groups.append({"params": head_params, "lr": h.head_learning_rate or h.learning_rate})
        optimizer = torch.optim.AdamW(groups, weight_decay=h.weight_decay)
        total = self.adalora.total_step or int(self.trainer.estimated_stepping_batches)
        warmup = resolve_steps("warmup_steps", h.warmup_steps, total)

        def linear(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lets `cli.py export` rebuild this module from the checkpoint alone; the settings as the method ran them.
        checkpoint[MODULE_CLASS_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint[CONFIG_KEY] = self.adalora.to_dict()

    def on_fit_start(self) -> None:
        params = {"params/trainable": float(self.trainable_parameter_count()),
                  "params/adapter": float(self.adapter_param_count())}
        rank_zero_info(f"{type(self.model).__name__} with method={self.method}: {int(params['params/trainable'])} "
                       f"trainable parameters, #Params (adapters) {int(params['params/adapter'])}")
        if self.logger is not None:
            self.logger.log_metrics(params, step=0)
