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

import importlib
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import Metric

from adalora_pl.baselines import ADAPTER_CLASSES, PruneLoRACallback, bottleneck_targets, linear_shapes, match_budget
from adalora_pl.callback import AdaLoRACallback
from adalora_pl.config import AdaLoRAConfig, Method, method_overrides, method_spec
from adalora_pl.errors import ConfigError
from adalora_pl.injection import (
    adapter_param_groups,
    count_adapter_parameters,
    inject_adapters,
    inside_any,
    is_linear,
    linear_layer_suffixes,
    name_matches,
    preset_targets,
    split_layer_path,
    trainable_module_names,
)
from adalora_pl.io.pretrained import check_backbone, load_pretrained
from adalora_pl.layers import set_kernel
from adalora_pl.quantized import QUANT_EXTRA, QuantizationUnavailable, describe, is_quantized
from adalora_pl.schedule import resolve_steps
from adalora_pl.sharding import adapter_shard_placement

log = logging.getLogger(__name__)

#: How the frozen base is loaded (``--model.quantization``): bitsandbytes 4-bit (nf4, fp4) and 8-bit, torchao int8.
Quantization = Literal["none", "nf4", "fp4", "int8", "torchao_int8"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
ComputeDtype = Literal["bfloat16", "float16", "float32"]
COMPUTE_DTYPES: tuple[str, ...] = get_args(ComputeDtype)
OptimizerName = Literal["adamw", "adamw8bit"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
CheckpointWeights = Literal["adapters", "full"]
CHECKPOINT_WEIGHTS: tuple[str, ...] = get_args(CheckpointWeights)
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


# ---------------------------------------------------------------------- quantized bases
#: The bitsandbytes kinds of ``--model.quantization`` (loaded through transformers' ``BitsAndBytesConfig``).
BNB_QUANTIZATIONS = ("nf4", "fp4", "int8")
#: The oldest transformers that loads a bitsandbytes base on a machine without CUDA (checked with bitsandbytes 0.50:
#: 4.45 and 4.48 fail in their multi-backend check, 4.51 and 4.52 ask for intel_extension_for_pytorch; 4.53 loads).
BNB_CPU_TRANSFORMERS = (4, 53)
#: The oldest bitsandbytes that runs every kind and the 8-bit AdamW on the CPU (0.47-0.49 refuse the optimizer there,
#: 0.46 also fp4).
BNB_CPU_FLOOR = (0, 50)
#: The oldest torchao whose ``Int8WeightOnlyConfig(version=2)`` gives the ``Int8Tensor`` weights the adapters wrap
#: with every attribute they read (0.15's lacks ``act_pre_scale``; 0.14 has no ``version``).
TORCHAO_FLOOR = (0, 16)
#: ``from_pretrained`` keywords that are not config fields (left out when only the config is read).
MODEL_ONLY_KWARGS = ("config", "dtype", "torch_dtype", "attn_implementation", "device_map", "quantization_config",
                     "ignore_mismatched_sizes")


def _release(version: str) -> tuple[int, ...]:
    """``(major, minor)`` of a version string (``"4.53.0.dev0"`` -> ``(4, 53)``)."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a parameter holds: its elements, plus what a quantized weight keeps beside them.

    A torchao weight is a tensor subclass whose inner tensors (int8 values, scales) are counted instead of its
    nominal dtype; a bitsandbytes 4-bit weight (packed uint8) adds its quantization state (block scales, and with
    double quantization their 8-bit form and its scales), an 8-bit one its per-row scales.
    """
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None:
        names, _ = flatten()
        return sum(tensor_bytes(inner) for inner in (getattr(tensor, n) for n in names) if inner is not None)
    size = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        size += sum(t.numel() * t.element_size() for t in state.as_dict(packed=False).values() if torch.is_tensor(t))
    scales = getattr(tensor, "SCB", None)
    if torch.is_tensor(scales):
        size += scales.numel() * scales.element_size()
    return size


class _Int8CastNotice(logging.Filter):
    """Drops bitsandbytes' ``MatMul8bitLt: inputs will be cast ... to float16`` records.

    LLM.int8() quantizes its input from float16 by design, and with the float32 activations of a prepared base
    bitsandbytes logs that at every forward of every int8 layer (2280 lines for a 4-step SmolLM2 run), burying the
    run's own output. Nothing else of that logger is dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_cast_notice() -> None:
    """Install :class:`_Int8CastNotice` on bitsandbytes' autograd logger, once."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Int8CastNotice) for f in logger.filters):
        logger.addFilter(_Int8CastNotice())


def _format_bytes(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.2f} MiB"


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
        quantization: how the frozen base is loaded: ``none``, ``nf4`` / ``fp4`` (bitsandbytes 4-bit, QLoRA),
            ``int8`` (bitsandbytes LLM.int8()) or ``torchao_int8`` (torchao int8 weight-only). The adapters stay
            float32. Needs the ``quant`` extra (``pip install "adalora-pl[quant]"``).
        quantization_compute_dtype: dtype a 4-bit base computes in (``bfloat16``, ``float16`` or ``float32``).
        double_quant: 4-bit only: quantize the quantization constants too (QLoRA's double quantization).
        optimizer: ``adamw`` (torch) or ``adamw8bit`` (bitsandbytes' 8-bit AdamW, for the adapters' states).
        checkpoint_weights: ``adapters`` (default: a checkpoint holds what trains, the masks, the optimizer and the
            callback state, plus a record of the base it belongs to, which loading rebuilds) or ``full`` (every
            weight, as Lightning writes by default).
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
            matches nothing; the message names the argument and the value. Also an opt-in option of README's
            "Faster-starting options" on a method without what it acts on (:meth:`check_faster_start_options`), or a
            ``rank_pattern`` file that cannot be read or does not fit the targeted modules.
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
        quantization: Quantization = "none",
        quantization_compute_dtype: ComputeDtype = "bfloat16",
        double_quant: bool = False,
        optimizer: OptimizerName = "adamw",
        checkpoint_weights: CheckpointWeights = "adapters",
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
        self.check_faster_start_options(method, spec.adapter, param_budget, quantization)
        for name, value, allowed in (("quantization", quantization, QUANTIZATIONS),
                                     ("quantization_compute_dtype", quantization_compute_dtype, COMPUTE_DTYPES),
                                     ("optimizer", optimizer, OPTIMIZERS),
                                     ("checkpoint_weights", checkpoint_weights, CHECKPOINT_WEIGHTS)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")
        if double_quant and quantization not in ("nf4", "fp4"):
            raise ConfigError(f"double_quant applies to 4-bit bases (quantization nf4 or fp4), not to {quantization!r}")
        self.backbone_name = backbone
        self.method = method
        self._sharded = False  # set by configure_model under ModelParallelStrategy
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
        layer_options: dict[str, Any] = {}
        if spec.adapter in ("adalora", "lora", "prune_lora"):  # the layers with a lora_alpha scaling
            layer_options["scaling"] = c.scaling
        if spec.adapter == "adalora":
            layer_options["adapter_init"] = c.adapter_init
        if c.rank_pattern is not None:
            layer_options["ranks"] = self.rank_pattern_ranks(c.rank_pattern, targets)
        self.adapters = inject_adapters(
            self.model, targets, method=ADAPTER_CLASSES[spec.adapter], r=r, lora_alpha=c.lora_alpha,
            lora_dropout=c.lora_dropout, trainable_modules=c.trainable_modules,
            autocast_adapter_dtype=c.autocast_adapter_dtype, **layer_options,
        )
        set_kernel(self.adapters.values(), c.kernel)

    def check_faster_start_options(self, method: str, adapter: str | None, param_budget: int | None,
                                   quantization: str) -> None:
        """Refuse the opt-in options of README's "Faster-starting options" where the method has nothing they act on
        (before the backbone loads).

        Raises:
            ConfigError: ``lr_ratio_b`` / ``scaling`` on a method without LoRA factors, ``lr_ratio_e`` without SVD
                adapters, ``rank_pattern`` on another method than ``lora`` or with ``param_budget``, ``weight_svd`` or
                ``gradient_svd`` on a quantized base; the message names the option, its value and what is allowed.
        """
        c = self.adalora
        factors = adapter in ("adalora", "lora", "prune_lora")
        if c.lr_ratio_b != 1 and not factors:
            raise ConfigError(f"lr_ratio_b={c.lr_ratio_b!r} scales the learning rate of lora_B, which "
                              f"method={method!r} does not have; use it with adalora, svd_lora, lora or prune_lora, "
                              "or leave it at 1")
        if c.lr_ratio_e != 1 and adapter != "adalora":
            raise ConfigError(f"lr_ratio_e={c.lr_ratio_e!r} scales the learning rate of the singular values "
                              f"lora_E, which method={method!r} does not have; use it with adalora or svd_lora, or "
                              "leave it at 1")
        if c.scaling != "alpha_over_r" and not factors:
            raise ConfigError(f"scaling={c.scaling!r} applies to LoRA-style adapters (adalora, svd_lora, lora, "
                              f"prune_lora), not to method={method!r}")
        if c.kernel != "reference" and not factors:
            raise ConfigError(f"kernel={c.kernel!r} computes LoRA-style adapters (adalora, svd_lora, lora, "
                              f"prune_lora), not method={method!r}; leave kernel at 'reference'")
        if c.kernel != "reference" and quantization != "none":
            raise ConfigError(f"kernel={c.kernel!r} covers float base weights; a quantized base (quantization="
                              f"{quantization!r}) runs bitsandbytes' / torchao's own matmul: leave kernel at "
                              "'reference'")
        if c.rank_pattern is not None and method != "lora":
            raise ConfigError(f"rank_pattern={c.rank_pattern!r} trains LoRA at the ranks an AdaLoRA run found: it "
                              f"applies to method='lora', not to method={method!r}")
        if c.rank_pattern is not None and param_budget is not None:
            raise ConfigError(f"rank_pattern fixes each module's rank; param_budget={param_budget!r} would choose one "
                              "uniform rank: give one of them")
        if c.adapter_init == "weight_svd" and quantization != "none":
            raise ConfigError(f"adapter_init='weight_svd' replaces each adapted base weight by its residual, which a "
                              f"quantized base (quantization={quantization!r}) cannot hold; use quantization='none' or "
                              "another adapter_init")
        if c.adapter_init == "gradient_svd" and quantization != "none":
            raise ConfigError(f"adapter_init='gradient_svd' needs the loss gradient of each adapted base weight, "
                              f"which a quantized base (quantization={quantization!r}) does not have; use "
                              "quantization='none' or another adapter_init")

    def rank_pattern_ranks(self, path: str, targets: list[str]) -> dict[str, int]:
        """The rank of each module the ``targets`` match, from the ``rank_pattern.json`` at ``path``
        (:func:`adalora_pl.io.report.read_rank_pattern`), keyed by path in the backbone.

        The file of a task module's fit names modules from the LightningModule (``model.bert.encoder...``); one of an
        :class:`~adalora_pl.AdaLoRACallback` run on a bare backbone names them from the backbone: both are accepted,
        whichever names exactly the targeted modules.

        Raises:
            ConfigError: the file cannot be read, or names modules the targets do not match / misses some they match
                (both listed, :func:`adalora_pl.injection.check_ranks`).
        """
        from adalora_pl.io.report import read_rank_pattern

        ranks = read_rank_pattern(path)
        skip = trainable_module_names(self.model, self.adalora.trainable_modules)
        targeted = {n for n, _ in self.model.named_modules()
                    if any(name_matches(n, t) for t in targets) and inside_any(n, skip) is None}
        prefix = "model."
        if all(k.startswith(prefix) for k in ranks):
            stripped = {k.removeprefix(prefix): v for k, v in ranks.items()}
            # The LightningModule's names, unless the file's own names are the backbone's already (a backbone whose
            # first module is called ``model``, e.g. Llama's, written by a callback run on the bare backbone).
            if set(stripped) == targeted or len(set(stripped) & targeted) > len(set(ranks) & targeted):
                ranks = stripped
        return ranks

    # ------------------------------------------------------------------ the backbone

    def build_backbone(self, backbone: str) -> nn.Module:
        """The pretrained transformers model: ``auto_class.from_pretrained(backbone, **backbone_kwargs(...))``.

        Called once, by ``__init__``, before the adapters are added. A mistyped folder or a hub id that cannot be
        reached raises :class:`~adalora_pl.io.pretrained.LoadError` with a one-line message. With ``quantization``
        other than ``none`` the base is loaded quantized and prepared for k-bit training
        (:meth:`load_quantized_backbone`).
        """
        if self.auto_class is None:
            raise NotImplementedError(f"{type(self).__name__} sets no auto_class and does not build its backbone")
        # check_backbone first: transformers reads any non-folder as a hub id ("Repo id must use alphanumeric chars")
        name = check_backbone(backbone)
        self.check_quantization_request()  # a missing extra or an impossible request fails before anything loads
        kwargs = self.backbone_kwargs(name)
        if self.hparams.get("quantization", "none") != "none":
            return self.load_quantized_backbone(name, kwargs)
        return load_pretrained(self.auto_class.from_pretrained, name, **kwargs)

    def backbone_kwargs(self, backbone: str) -> dict[str, Any]:
        """Keyword arguments of ``from_pretrained`` besides the name (none here; GLUE passes its label config).

        The quantization settings are not among them: :meth:`load_quantized_backbone` adds them, so that a task
        module's own ``backbone_kwargs`` need not know about quantization.

        Args:
            backbone: the checked name (a hub id, or a folder with ``~`` expanded).
        """
        return {}

    # ------------------------------------------------------------------ quantized bases (k-bit training)

    def check_quantization_request(self) -> None:
        """Refuse, before anything is loaded, a quantized base or an 8-bit optimizer that cannot run here.

        Raises:
            QuantizationUnavailable: (a :class:`ConfigError`) bitsandbytes (``nf4``, ``fp4``, ``int8``, ``adamw8bit``)
                or torchao (``torchao_int8``) cannot be imported; one line naming ``pip install "adalora-pl[quant]"``.
            ConfigError: ``method="full"`` on a quantized base (its weights cannot train); without CUDA, bitsandbytes
                older than 0.50 or, for a bitsandbytes base, transformers older than 4.53; torchao older than 0.16.
        """
        h = self.hparams
        kind, optimizer = h.get("quantization", "none"), h.get("optimizer", "adamw")
        needed = []
        if kind in BNB_QUANTIZATIONS:
            needed.append(("bitsandbytes", f"quantization={kind!r}"))
        if optimizer == "adamw8bit":
            needed.append(("bitsandbytes", "optimizer='adamw8bit'"))
        if kind == "torchao_int8":
            needed.append(("torchao", f"quantization={kind!r}"))
        versions = {}
        for package, what in needed:
            try:
                versions[package] = importlib.import_module(package).__version__
            except ImportError as err:
                raise QuantizationUnavailable(
                    f"{what} needs {package}, which cannot be imported ({type(err).__name__}: {err}); install the "
                    f"quant extra: {QUANT_EXTRA}"
                ) from None
        if "bitsandbytes" in versions and not torch.cuda.is_available() and (
                _release(versions["bitsandbytes"]) < BNB_CPU_FLOOR):
            what = f"quantization={kind!r}" if kind in BNB_QUANTIZATIONS else "optimizer='adamw8bit'"
            raise ConfigError(f"{what} without CUDA needs bitsandbytes>=0.50 (its CPU backend; installed: "
                              f"{versions['bitsandbytes']}); upgrade it: {QUANT_EXTRA}")
        if kind == "none":
            return
        if self.method == "full":
            raise ConfigError(f"method='full' trains every weight, and the weights of a quantized base "
                              f"(quantization={kind!r}) cannot train; use an adapter method (adalora, lora, ...) or "
                              "quantization='none'")
        if kind in BNB_QUANTIZATIONS and not torch.cuda.is_available():
            import transformers

            if _release(transformers.__version__) < BNB_CPU_TRANSFORMERS:
                raise ConfigError(
                    f"quantization={kind!r} without CUDA needs transformers>=4.53 to load a bitsandbytes base on the "
                    f"CPU (installed: {transformers.__version__}); upgrade transformers or run on a CUDA machine"
                )
        if kind == "torchao_int8" and _release(versions["torchao"]) < TORCHAO_FLOOR:
            raise ConfigError(f"quantization='torchao_int8' needs torchao>=0.16 (its Int8Tensor weights; installed: "
                              f"{versions['torchao']}); upgrade it: {QUANT_EXTRA}")

    def quantized_base_device(self) -> torch.device:
        """Where a quantized base is loaded: this process's CUDA device where CUDA is available (``LOCAL_RANK`` under
        DDP), else the CPU.

        bitsandbytes quantizes a weight when it reaches its device and transformers refuses to move an 8-bit model, so
        the base is placed when it loads; the Trainer's later move to the same device changes nothing. (A run on the
        CPU of a CUDA machine, ``accelerator="cpu"``, would find the base on the GPU.)
        """
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")

    def unquantized_linears(self, model: nn.Module) -> list[str]:
        """Paths of the linear layers of ``model`` a quantized base keeps unquantized: those inside the
        ``trainable_modules`` (trained in full: the task heads), the output embeddings (a language model's
        ``lm_head``, often tied to the input embeddings) and the layer of the model's last parameter (the output
        layer of any other head), which transformers also leaves unquantized by default."""
        heads = trainable_module_names(model, self.adalora.trainable_modules)
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        params = [n for n, _ in model.named_parameters()]
        last = params[-1].rpartition(".")[0] if params else None
        return [n for n, m in model.named_modules()
                if is_linear(m) and (inside_any(n, heads) is not None or m is output or n == last)]

    def skeleton_unquantized_linears(self, name: str, kwargs: Mapping[str, Any]) -> list[str]:
        """:meth:`unquantized_linears` of the model ``from_pretrained(name, **kwargs)`` would build, read from an empty
        copy on the meta device (no weights load): bitsandbytes must be told what to leave alone before it loads.

        Full paths, not names: transformers 5.x matches each against a module's path from its start or as its ending,
        4.x as a whole path or a ``name.`` inside one; a full path works in both, a bare head name like ``pooler``
        (whose linear is ``bert.pooler.dense``) only in 4.x.
        """
        from transformers import AutoConfig

        config = kwargs.get("config")
        if config is None:
            config_kwargs = {k: v for k, v in kwargs.items() if k not in MODEL_ONLY_KWARGS}
            config = load_pretrained(AutoConfig.from_pretrained, name, **config_kwargs)
        with torch.device("meta"):
            skeleton = self.auto_class.from_config(config, trust_remote_code=bool(kwargs.get("trust_remote_code")))
        return self.unquantized_linears(skeleton)

    def load_quantized_backbone(self, name: str, kwargs: dict[str, Any]) -> nn.Module:
        """The backbone loaded with ``quantization`` and prepared for k-bit training.

        - ``nf4`` / ``fp4`` / ``int8``: bitsandbytes through transformers (``BitsAndBytesConfig``): 4-bit with
          ``quantization_compute_dtype`` and ``double_quant``, or LLM.int8(); quantized while it loads, on
          :meth:`quantized_base_device`.
        - ``torchao_int8``: the model loads as usual, then torchao's ``quantize_`` with ``Int8WeightOnlyConfig``
          (int8 weights, one scale per output row) replaces the weight of every ``nn.Linear`` it quantizes. Chosen
          over transformers' ``TorchAoConfig`` because the filter runs on the loaded model, so exactly the layers
          :meth:`unquantized_linears` names stay unquantized, whatever the transformers release (its
          ``modules_to_not_convert`` matching changed between 4.x and 5.x, and ``TorchAoConfig`` takes only a name
          string in 4.45, only a torchao config object in 5.x); the cost is the unquantized weights in memory once,
          while loading.

        Linear layers inside ``trainable_modules``, the output embeddings and the last layer stay unquantized
        (:meth:`unquantized_linears`). Then :meth:`prepare_quantized_base`.

        Raises:
            ConfigError: transformers or torchao refused the model (a kind it does not support for this
                architecture), or nothing was quantized; one line naming the backbone and the reason.
        """
        kind = self.hparams.quantization
        device = self.quantized_base_device()
        kwargs = {**kwargs, "device_map": {"": str(device)}}  # "cuda:0" or "cpu", as every transformers release takes
        try:
            if kind in BNB_QUANTIZATIONS:
                from transformers import BitsAndBytesConfig

                keep = self.skeleton_unquantized_linears(name, kwargs)
                if kind == "int8":
                    _quiet_int8_cast_notice()
                    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
                else:
                    config = BitsAndBytesConfig(
                        load_in_4bit=True, bnb_4bit_quant_type=kind, llm_int8_skip_modules=keep,
                        bnb_4bit_compute_dtype=getattr(torch, self.hparams.quantization_compute_dtype),
                        bnb_4bit_use_double_quant=bool(self.hparams.double_quant),
                    )
                model = load_pretrained(self.auto_class.from_pretrained, name, quantization_config=config, **kwargs)
            else:
                from torchao.quantization import Int8WeightOnlyConfig, quantize_

                model = load_pretrained(self.auto_class.from_pretrained, name, **kwargs)
                keep = set(self.unquantized_linears(model))
                # version=2: the Int8Tensor weight (torchao's default from 0.18; 0.16 and 0.17 default to the older
                # AffineQuantizedTensor). No inductor settings: nothing here is compiled.
                quantize_(model, Int8WeightOnlyConfig(version=2, set_inductor_config=False),
                          filter_fn=lambda module, path: isinstance(module, nn.Linear) and path not in keep)
        except ConfigError:
            raise
        except (ValueError, RuntimeError, TypeError, ImportError, NotImplementedError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
            raise ConfigError(f"could not load the backbone {name!r} with quantization={kind!r} as "
                              f"{self.auto_class.__name__} ({type(err).__name__}: {reason})") from err
        return self.prepare_quantized_base(model)

    def prepare_quantized_base(self, model: nn.Module) -> nn.Module:
        """What k-bit training needs, done once for every task: the model frozen (the adapters and the
        ``trainable_modules`` are unfrozen when they are added), and every parameter outside the quantized layers
        (norms, embeddings, the heads, biases) in float32, as PEFT's ``prepare_model_for_kbit_training`` does: a
        bfloat16 norm or head loses the precision the quantized weights already gave up, and float32 activations
        keep the adapters' inputs exact. The quantized layers keep their own dtypes (a 4-bit layer casts its input
        to its compute dtype and its output back). Gradient checkpointing, where asked, is set up by
        :meth:`enable_gradient_checkpointing`.

        Says in one line (logged at INFO on rank 0, and kept as :attr:`quantization_report`) which layers are
        quantized and how many, what stays float32, and the parameter bytes of the base before (unquantized, in the
        dtype it loaded in) and after.

        Raises:
            ConfigError: no layer was quantized (a model without ``nn.Linear`` layers, e.g. GPT-2's ``Conv1D``).
        """
        kind = self.hparams.quantization
        quantized = {n: m for n, m in model.named_modules() if is_quantized(m)}
        if not quantized:
            raise ConfigError(f"quantization={kind!r} quantized no layer of {type(model).__name__} (it quantizes "
                              f"nn.Linear layers; linear layers of this model: {linear_layer_suffixes(model)})")
        inside = {id(p) for m in quantized.values() for p in m.parameters()}
        loaded = next((p.dtype for p in model.parameters() if id(p) not in inside and p.is_floating_point()),
                      torch.float32)
        before = sum(tensor_bytes(p) for p in model.parameters() if id(p) not in inside) + sum(
            m.in_features * m.out_features * loaded.itemsize + (tensor_bytes(m.bias) if m.bias is not None else 0)
            for m in quantized.values())
        model.requires_grad_(False)
        kept: Counter[str] = Counter()
        quantized_ids = {id(m) for m in quantized.values()}
        for module in model.modules():
            if id(module) in quantized_ids:
                continue
            own = list(module.parameters(recurse=False))
            for p in own:
                if p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.float()  # in place: tied weights (lm_head = embed_tokens) stay tied
            if own and not is_linear(module):  # the linear ones are named in the line
                kept[type(module).__name__] += 1
        after = sum(tensor_bytes(p) for p in model.parameters())
        unquantized = self.unquantized_linears(model)
        layer_names = sorted({split_layer_path(n)[2] for n in quantized})
        self.quantization_report = {
            "kind": kind, "quantized_layers": list(quantized), "unquantized_linears": unquantized,
            "bytes_before": before, "bytes_after": after, "device": str(next(model.parameters()).device),
        }
        rank_zero_info(
            f"quantized base ({kind}): {len(quantized)} linear layers as {describe(next(iter(quantized.values())))} "
            f"[{', '.join(layer_names)}]; float32, unquantized: {', '.join(unquantized) or 'no linear layer'} and "
            f"{', '.join(f'{n} {c}' for c, n in sorted(kept.items()))}; base parameters {_format_bytes(before)} "
            f"({loaded}) -> {_format_bytes(after)} on {self.quantization_report['device']}"
        )
        return model

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block's activations in backward (transformers' gradient checkpointing, same gradients,
        less memory), non-reentrant: it back-propagates into the adapters even though no input of a block requires
        grad (the embeddings are frozen), where the reentrant kind would silently give them no gradient. The model's
        cache is turned off (useless in training, and it conflicts with recomputation).

        On a quantized base the input embeddings' output is made to require grad too
        (``enable_input_require_grads``), as PEFT's ``prepare_model_for_kbit_training`` does: not needed with the
        non-reentrant kind, but it keeps the adapters' gradients should a block be checkpointed the reentrant way
        (an older transformers, or model code that picks its own), at the cost of one input gradient.
        """
        model = self.model
        # transformers 5.x renamed the switch; the old name still works there but warns.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if self.hparams.get("quantization", "none") != "none":
            model.enable_input_require_grads()

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

    # ------------------------------------------------------------------ sharding (ModelParallelStrategy)

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``, shard the backbone with FSDP2: each of
        :meth:`sharding_units` (the transformer blocks), then the rest (embeddings, heads) with the root. The
        adapters are sharded with their block (they are in the module since ``__init__``), ``lora_A`` along its
        input dimension so that the orthogonal regularizer sums local Grams (``adalora_pl.sharding``).

        A no-op under other strategies, and when the model is sharded already (Lightning calls this hook again
        after ``AdaLoRACallback`` did). Tensor parallelism is refused (``tensor_parallel_size`` must be 1).
        """
        mesh = self.device_mesh
        if mesh is None or self._sharded:
            return
        from torch.distributed.fsdp import fully_shard

        if "tensor_parallel" in mesh.mesh_dim_names and mesh["tensor_parallel"].size() > 1:
            raise ConfigError(f"tensor_parallel_size={mesh['tensor_parallel'].size()}: AdaLoRA shards with FSDP2 "
                              "data parallelism only; use ModelParallelStrategy(tensor_parallel_size=1)")
        if self.adalora.adapter_init in ("weight_svd", "gradient_svd"):
            # Not handled: the initial triplets and the residual base weights would have to be sharded consistently,
            # and the exports rebuild W from both; the gradient's SVD would need the whole gradient on every rank.
            raise ConfigError(f"adapter_init={self.adalora.adapter_init!r} is not supported under "
                              "ModelParallelStrategy (sharded base weights); use another adapter_init, or DDP")
        data_mesh = mesh["data_parallel"] if "data_parallel" in mesh.mesh_dim_names else mesh
        placement = adapter_shard_placement(self.model, data_mesh.size())
        for unit in self.sharding_units():
            fully_shard(unit, mesh=data_mesh, shard_placement_fn=placement)
        fully_shard(self.model, mesh=data_mesh, shard_placement_fn=placement)
        self._sharded = True
        rank_zero_info(f"FSDP2: {type(self.model).__name__} sharded over {data_mesh.size()} ranks in "
                       f"{len(self.sharding_units())} blocks and the root")

    def sharding_units(self) -> list[nn.Module]:
        """The modules :meth:`configure_model` shards one by one: the blocks of every ``nn.ModuleList`` of
        identical blocks in the backbone (``model.layers`` of Llama-like models, ``encoder.layer`` of BERT-like ones,
        BART's encoder and decoder layers). Override to choose others."""
        units: list[nn.Module] = []
        inside: set[int] = set()  # modules within a chosen block (their own lists are not blocks of the model)
        for module in self.model.modules():
            if (isinstance(module, nn.ModuleList) and id(module) not in inside and len(module) > 1
                    and len({type(m) for m in module}) == 1):
                units.extend(module)
                inside.update(id(m) for unit in module for m in unit.modules())
        return units

    def adapter_param_count(self) -> int:
        """#Params as the paper reports it (adapter parameters, kept ranks only; heads excluded)."""
        return count_adapter_parameters(self.model, kept_only=True)

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the adapters (``learning_rate``) and the trained heads (``head_learning_rate``), or
        bitsandbytes' ``AdamW8bit`` with ``optimizer="adamw8bit"``; a linear warm-up over ``warmup_steps``, then a
        linear decay to 0 at the last step, stepped every optimizer step."""
        h = self.hparams
        adapter_params, head_params = [], []
        adapter_ids = {id(p) for m in self.adapters.values() for n, p in m.named_parameters()
                       if not n.startswith("base_layer.")}
        for p in self.parameters():
            if p.requires_grad:
                (adapter_params if id(p) in adapter_ids or self.method == "full" else head_params).append(p)
        groups = [{"params": adapter_params, "lr": h.learning_rate}]
        ratio_b, ratio_e = self.adalora.lr_ratio_b, self.adalora.lr_ratio_e
        if (ratio_b != 1 or ratio_e != 1) and self.method != "full":
            # LoRA+-style per-factor learning rates: A, B and E groups (adapter_param_groups). With both ratios 1 the
            # one group above stays: the reference's optimizer, and the group layout of older checkpoints.
            groups = adapter_param_groups(self, h.learning_rate, ratio_b, ratio_e)
        if head_params:
            groups.append({"params": head_params, "lr": h.head_learning_rate or h.learning_rate})
        if h.get("optimizer", "adamw") == "adamw8bit":
            import bitsandbytes as bnb  # importable: check_quantization_request said so at construction

            # The same groups, betas (0.9, 0.999) and eps (1e-8) as torch's AdamW, and the same schedule below. The
            # states of tensors with at least 4096 elements (bitsandbytes' min_8bit_size) are 8-bit, blockwise
            # quantized; smaller ones (a rank-r vector, a small head) keep 32-bit states, as bitsandbytes decides.
            optimizer = bnb.optim.AdamW8bit(groups, weight_decay=h.weight_decay)
        else:
            optimizer = torch.optim.AdamW(groups, weight_decay=h.weight_decay)
        total = self.adalora.total_step or int(self.trainer.estimated_stepping_batches)
        warmup = resolve_steps("warmup_steps", h.warmup_steps, total)

        def linear(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints

    # The state dict of an adapter-only checkpoint that on_load_checkpoint checked, and the frozen keys it may leave
    # out: load_state_dict loads that one dict without the frozen base (see there).
    _checked_adapter_state: tuple[Mapping[str, Any], set[str]] | None = None

    def saves_adapters_only(self) -> bool:
        """Whether checkpoints leave out the frozen base: ``checkpoint_weights="adapters"``, except for full
        fine-tuning, where everything trains, and under ``ModelParallelStrategy``: Lightning loads a distributed
        checkpoint by asking it for every key of the sharded model, so there the base is written too (each rank
        writes its shard of it)."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        sharded = self._trainer is not None and isinstance(self._trainer.strategy, ModelParallelStrategy)
        adapters_only = self.hparams.get("checkpoint_weights", "adapters") == "adapters" and self.method != "full"
        return adapters_only and not sharded

    def base_revision(self) -> str | None:
        """The revision of the backbone, where transformers recorded it (a hub download); None for a local folder."""
        return getattr(getattr(self.model, "config", None), "_commit_hash", None)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the module class and its AdaLoRA settings; with ``checkpoint_weights="adapters"``, keep only what
        trains (and the adapters' buffers) of the state dict and record the base it belongs to.

        Lightning calls this after the callbacks' hooks: AdaLoRACallback has zeroed the masked singular values of the
        entries kept here. The optimizer, schedulers, loops and callback states stay as Lightning writes them.
        """
        # Lets `cli.py export` rebuild this module from the checkpoint alone; the settings as the method ran them.
        checkpoint[MODULE_CLASS_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint[CONFIG_KEY] = self.adalora.to_dict()
        # Imported here: adalora_pl.io.checkpoint imports this module (its keys and the task classes).
        from adalora_pl.io.checkpoint import WEIGHTS_KEY, keep_trained_state

        if not self.saves_adapters_only():
            checkpoint[WEIGHTS_KEY] = "full"
            return
        # A 7B base is 14 GB at every save, its trained state (adapters, their AdamW moments and importance
        # averages) a few hundred MB: the base is loaded from the backbone again instead.
        keep_trained_state(self, checkpoint, self.backbone_name, self.base_revision(), self.hparams)

    def prepare_checkpoint_load(self, checkpoint: Mapping[str, Any], source: str | None = None) -> None:
        """Get ready to load ``checkpoint``'s state dict: for an adapter-only checkpoint, check that this module's
        base is the one it records and that its keys fit (every key one of the module's, every module key it lacks a
        frozen one), and let :meth:`load_state_dict` load that state dict without the frozen base. A full checkpoint
        loads as Lightning loads it (strictly, unless ``strict_loading`` says otherwise).

        Args:
            checkpoint: the loaded checkpoint.
            source: the checkpoint's file, for messages (default: the Trainer's ``ckpt_path``).

        Raises:
            ConfigError: another base (another backbone, other weights, other quantization settings) or keys that do
                not fit; one line naming ``source``, the backbone and what differs.
        """
        from adalora_pl.io.checkpoint import WEIGHTS_KEY, check_adapter_checkpoint

        self._checked_adapter_state = None
        if checkpoint.get(WEIGHTS_KEY) != "adapters":
            return
        if source is None:
            path = self._trainer.ckpt_path if self._trainer is not None else None
            source = str(path) if path else "the checkpoint"
        frozen = check_adapter_checkpoint(self, checkpoint, self.backbone_name, self.hparams, source)
        self._checked_adapter_state = (checkpoint["state_dict"], frozen)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """See :meth:`prepare_checkpoint_load` (Lightning calls this hook before it loads the state dict, on a resume,
        ``validate/test/predict(ckpt_path=...)`` and ``load_from_checkpoint``)."""
        self.prepare_checkpoint_load(checkpoint)

    @property
    def strict_loading(self) -> bool:
        """Lightning's ``strict_loading``, False only while an adapter-only state dict that
        :meth:`prepare_checkpoint_load` checked waits to be loaded.

        Loaders that take ``strict`` from here without calling :meth:`load_state_dict` (Lightning's FSDP and
        model-parallel strategies) then load it without the frozen base; its keys were checked as strict loading
        checks them, except for the frozen ones.
        """
        return self._checked_adapter_state is None and pl.LightningModule.strict_loading.fget(self)

    @strict_loading.setter
    def strict_loading(self, strict_loading: bool) -> None:
        pl.LightningModule.strict_loading.fset(self, strict_loading)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, except for the adapter-only state dict :meth:`prepare_checkpoint_load` has
        just checked: that one loads without the frozen base, and only without it.

        Lightning loads with ``strict=self.strict_loading``: making that False for good would let any missing key of
        any checkpoint through. Here exactly the checked frozen keys may be missing; any other missing or unexpected
        key still fails as strict loading fails. Full checkpoints load as asked.
        """
        checked, self._checked_adapter_state = self._checked_adapter_state, None
        if checked is None or checked[0] is not state_dict:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k not in checked[1]]
        if missing or result.unexpected_keys:  # prepare_checkpoint_load refuses these before anything loads
            raise RuntimeError(f"adapter-only state dict: {len(missing)} missing keys besides the frozen base "
                               f"(e.g. {missing[:2]}), unexpected keys {result.unexpected_keys[:2]}")
        return result._replace(missing_keys=[])

    def on_fit_start(self) -> None:
        params = {"params/trainable": float(self.trainable_parameter_count()),
                  "params/adapter": float(self.adapter_param_count())}
        rank_zero_info(f"{type(self.model).__name__} with method={self.method}: {int(params['params/trainable'])} "
                       f"trainable parameters, #Params (adapters) {int(params['params/adapter'])}")
        if self.logger is not None:
            self.logger.log_metrics(params, step=0)
