"""Adapter layers: the SVD adapter of AdaLoRA and the plain LoRA baseline.

Both wrap a frozen linear layer (``nn.Linear`` or GPT-2's ``Conv1D``, or a quantized linear of bitsandbytes or
torchao: :mod:`adalora_pl.quantized`) kept as ``base_layer`` and add a low-rank branch. The arithmetic of
:class:`SVDLinear` follows the reference implementations operation for operation (docs/method.md §1), so that
masks and parameters can be compared with PEFT bitwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal, get_args

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adalora_pl import quantized
from adalora_pl.errors import ConfigError
from adalora_pl.fused_add import _functorch_active, add_scaled
from adalora_pl.fused_branch import fused_adapted_linear

# Added to ranknum before dividing, as in the reference code (keeps a rank-0 layer finite).
RANKNUM_EPS = 1e-5

def linear_shape(base_layer: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, fan_in_fan_out)`` of a linear-like layer.

    GPT-2's ``Conv1D`` stores its weight as (in, out), hence ``fan_in_fan_out``. A quantized ``nn.Linear`` subclass
    (bitsandbytes) has a packed weight: its shape is read from ``in_features`` / ``out_features``, as for any
    ``nn.Linear``.
    """
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features, False
    if isinstance(base_layer, Conv1D):
        in_features, out_features = base_layer.weight.shape
        return in_features, out_features, True
    raise TypeError(
        f"adapters wrap nn.Linear or transformers' Conv1D layers, got {type(base_layer).__name__}"
    )


HALF_DTYPES = (torch.float16, torch.bfloat16)
#: How an SVD adapter starts: the reference's N(0, 0.02) factors with E = 0, orthonormal factors with E = 0, the
#: top singular triplets of the base weight, which then holds the residual, or the top singular vectors of the loss
#: gradient of the base weight over the first batches with E = 0 (docs/method.md §13).
AdapterInit = Literal["reference", "orthogonal", "weight_svd", "gradient_svd"]
ADAPTER_INITS: tuple[str, ...] = get_args(AdapterInit)
#: How the update is scaled: ``lora_alpha / r`` (the reference; AdaLoRA divides by ``ranknum + 1e-5``), or rsLoRA's
#: ``lora_alpha / sqrt(r)`` (Kalajdzievski 2023, arXiv 2312.03732; AdaLoRA: ``lora_alpha / sqrt(ranknum + 1e-5)``).
Scaling = Literal["alpha_over_r", "alpha_over_sqrt_r"]
SCALINGS: tuple[str, ...] = get_args(Scaling)
#: The buffers of an SVD adapter started from the base weight's SVD (``adapter_init="weight_svd"``): its initial
#: triplets, whose product the base weight gave up (the residual ``W - scale * B0 diag(E0) A0`` is the base layer's
#: weight). Exports rebuild the pretrained weight, and a delta relative to it, from these.
INITIAL_TENSORS = ("init_lora_A", "init_lora_E", "init_lora_B")
#: How an adapted layer computes: ``"reference"`` (the reference implementations' expressions, bitwise PEFT's) or
#: ``"fused"`` (one autograd Function for the base matmul and the branch, fewer passes over the activations, equal to
#: the reference to rounding; :mod:`adalora_pl.fused_branch`, docs/method.md §14).
Kernel = Literal["reference", "fused"]
KERNELS: tuple[str, ...] = get_args(Kernel)


def check_kernel(kernel: str) -> None:
    """Refuse an unknown adapter kernel.

    Raises:
        ConfigError: naming the value and the allowed ones.
    """
    if kernel not in KERNELS:
        raise ConfigError(f"kernel must be one of {list(KERNELS)}, got {kernel!r}")


def set_kernel(adapters: nn.Module | Iterable[nn.Module], kernel: Kernel) -> None:
    """Set how the adapter layers compute (``"reference"`` or ``"fused"``, see :data:`Kernel`).

    Args:
        adapters: adapter layers, or a module whose adapter layers (every :class:`AdapterLayer` inside) are set.
        kernel: ``"reference"`` or ``"fused"``.

    Raises:
        ConfigError: an unknown kernel.
    """
    check_kernel(kernel)
    layers = adapters.modules() if isinstance(adapters, nn.Module) else adapters
    for layer in layers:
        if isinstance(layer, AdapterLayer):
            layer.kernel = kernel


def check_scaling(scaling: str) -> None:
    """Refuse an unknown scaling rule.

    Raises:
        ConfigError: naming the value and the allowed ones.
    """
    if scaling not in SCALINGS:
        raise ConfigError(f"scaling must be one of {list(SCALINGS)}, got {scaling!r}")


def adapter_dtype(base_dtype: torch.dtype, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The dtype of an adapter's parameters on a base layer of ``base_dtype``.

    float32 for float16/bfloat16 base weights unless ``autocast_adapter_dtype`` is False (PEFT's default too):
    late in a decayed schedule AdamW's updates of a half-precision adapter round away to nothing.
    """
    if autocast_adapter_dtype and base_dtype in HALF_DTYPES:
        return torch.float32
    return base_dtype


class AdapterLayer(nn.Module):
    """Base of every adapter layer: frozen base layer, dropout, merge/unmerge bookkeeping.

    Subclasses (here and in :mod:`adalora_pl.baselines`) define ``forward`` and ``delta_weight``, and create
    their parameters with :meth:`adapter_factory`.

    Args:
        base_layer: the ``nn.Linear`` (or GPT-2 ``Conv1D``) to adapt; its parameters are frozen. A quantized linear
            (bitsandbytes 4-bit / int8, torchao int8 weight-only) runs quantized; any other quantized layer is a
            ConfigError naming its type (:func:`adalora_pl.quantized.check_adaptable`).
        r: rank (bottleneck size for bottleneck adapters).
        lora_alpha: scaling numerator.
        lora_dropout: dropout probability on the adapter branch only.
        autocast_adapter_dtype: keep the adapter's parameters in float32 when the base layer is float16 or
            bfloat16 (default, as PEFT), and on a quantized base whatever its compute dtype. False: the base
            layer's dtype (a quantized base's compute dtype, :func:`adalora_pl.quantized.compute_dtype`).

    Attributes:
        quantization: the base layer's quantization kind (``"nf4"``, ``"fp4"``, ``"int8"``, ``"torchao_int8"``) or
            None.
    """

    def __init__(
        self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        super().__init__()
        if r < 0:
            raise ConfigError(f"adapter rank r must be >= 0, got {r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        self.quantization = quantized.quantization_kind(base_layer)  # refuses what cannot be adapted, by type
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
        if self.quantization is not None:
            quantized.keep_exact(base_layer)
        self.base_layer = base_layer
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight: model code that reads ``layer.weight`` (T5's FFN checks its dtype) sees it."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def adapter_factory(self) -> dict:
        """``device``/``dtype`` keyword arguments for the adapter's own tensors."""
        weight = self.base_layer.weight
        if self.quantization is None:
            return {"device": weight.device, "dtype": adapter_dtype(weight.dtype, self.autocast_adapter_dtype)}
        # The stored weight of a quantized layer is uint8 / int8 (or a subclass): the adapter takes float32, or the
        # dtype the layer computes in without autocast. float32 also for a float32 compute dtype, so always float32.
        dtype = torch.float32 if self.autocast_adapter_dtype else quantized.compute_dtype(self.base_layer)
        return {"device": weight.device, "dtype": dtype}

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The adapter's own parameters (everything but the base layer's)."""
        return [p for n, p in self.named_parameters() if not n.startswith("base_layer.")]

    # The base layer's quantization kind (adalora_pl.quantized.quantization_kind), None for a plain layer; set per
    # instance by __init__ (the class default serves instances unpickled from before it existed).
    quantization: str | None = None
    # Parameters one kept rank costs, for adapters that prune ranks (and carry a ``rank_mask``); None otherwise.
    parameters_per_rank: int | None = None
    # The branch's residual add in one pass where that is exact (adalora_pl.fused_add.add_scaled); False on an
    # instance evaluates the reference's plain expressions instead, the same numbers (benchmarks/step_time.py
    # measures what the fusion buys). Per layer rather than a module global: two models in one process may differ.
    fuse_residual_add: bool = True
    # "reference" or "fused" (see Kernel, set_kernel); per layer for the same reason.
    kernel: str = "reference"

    def _fused_applies(self, x: torch.Tensor) -> bool:
        """Whether this forward takes the fused kernel: asked for, and on a layer it covers (a plain frozen float
        ``nn.Linear`` / ``Conv1D`` weight, no hooks on the base layer, no functorch transform or compiler tracing);
        anything else computes the reference expressions."""
        if self.kernel != "fused" or self.quantization is not None or not x.is_floating_point():
            return False
        base = self.base_layer
        weight, bias = base.weight, base.bias
        # Exactly a tensor / parameter: not a DTensor shard, nor a torchao or other tensor subclass.
        if type(weight) not in (torch.Tensor, nn.Parameter) or weight.requires_grad or not weight.is_floating_point():
            return False
        if bias is not None and (type(bias) not in (torch.Tensor, nn.Parameter) or bias.requires_grad):
            return False
        if base._forward_hooks or base._forward_pre_hooks or type(base).forward not in (nn.Linear.forward,
                                                                                       Conv1D.forward):
            return False
        return not (torch.compiler.is_compiling() or _functorch_active())

    def _branch_dropout_p(self) -> float:
        """The branch's dropout probability in this forward (0 in eval mode or without dropout)."""
        dropout = self.lora_dropout
        return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0

    @property
    def kept_rank(self) -> int:
        """Number of ranks the last mask kept (host sync; not for the hot path)."""
        return int(self.rank_mask.sum())

    def parameter_count(self, kept_only: bool = False) -> int:
        """Elements of the adapter's parameters; ``kept_only`` counts a pruning adapter's kept ranks only (#Params
        as the paper's tables count it)."""
        if kept_only and self.parameters_per_rank is not None:
            return self.kept_rank * self.parameters_per_rank
        return sum(p.numel() for p in self.adapter_parameters())

    def _apply(self, fn, recurse: bool = True):
        """``Module.to``/``half``/``bfloat16`` and friends: the base layer converts, and with
        ``autocast_adapter_dtype`` a float32 adapter keeps its dtype (it still moves between devices).

        A "bf16-true"/"16-true" Trainer converts the whole module with ``module.to(dtype)`` while setting up its
        strategy, after the callback injected the adapters: refusing the cast here keeps the adapter's float32
        values exact (no round trip through bfloat16, also for a checkpoint restored before that conversion), and
        keeps its parameter objects before DDP registers them.
        """
        if recurse:
            for child in self.children():
                child._apply(fn)
        if not self.autocast_adapter_dtype:
            return super()._apply(fn, recurse=False)

        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.dtype == torch.float32 and out.dtype in HALF_DTYPES:
                return t.to(device=out.device)  # the move without the cast
            return out

        return super()._apply(keep_float32, recurse=False)

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _orient(self, delta: torch.Tensor) -> torch.Tensor:
        # Conv1D keeps the weight as (in, out): the (out, in) delta is transposed to match.
        return delta.T if self.fan_in_fan_out else delta

    def _refuse_quantized_merge(self) -> None:
        if self.quantization is not None:
            raise NotImplementedError(
                f"cannot merge in place into a quantized base layer ({quantized.describe(self.base_layer)}): its "
                "weight is stored quantized. Use adalora_pl.merge_adapters(model), which dequantizes it, adds the "
                "update in float32 and puts a plain nn.Linear in its place"
            )

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``base_layer.weight`` (inference only; the branch is then skipped).

        Raises:
            NotImplementedError: the base layer is quantized (see :func:`adalora_pl.merge_adapters` instead).
        """
        self._refuse_quantized_merge()
        if self.merged:
            return
        weight = self.base_layer.weight
        weight += self._orient(self.delta_weight())  # in the wider dtype, rounded once into the weight
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        self._refuse_quantized_merge()
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight -= self._orient(self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, lora_alpha={self.lora_alpha}"


class SVDLinear(AdapterLayer):
    """A frozen linear layer plus AdaLoRA's SVD-shaped update ``B diag(E) A``.

    ``y = base(x) + lora_alpha / (ranknum + 1e-5) * B @ ((A * E) @ dropout(x))``

    Args:
        base_layer: the ``nn.Linear`` (or GPT-2 ``Conv1D``) to adapt; its parameters are frozen.
        r: initial rank (``init_r``). ``ranknum`` is fixed to it forever: pruning zeroes singular
            values in ``lora_E`` but never changes the scaling.
        lora_alpha: scaling numerator (the reference divides by ranknum, not by r).
        lora_dropout: dropout probability on the adapter branch only.
        autocast_adapter_dtype: float32 adapter tensors on a float16/bfloat16 base layer (default).
        adapter_init: ``"reference"`` (default; A, B ~ N(0, 0.02), as the authors' code and PEFT),
            ``"orthogonal"``: A with orthonormal rows and B with orthonormal columns, the state the orthogonal
            regularizer drives them to (E = 0 either way, so the layer starts equal to ``base_layer``), or
            ``"weight_svd"`` (PiSSA-like, Meng et al. 2024, arXiv 2404.02948): A, E, B are the top-``r`` singular
            triplets of the base weight W (E divided by the scale, so that the update is ``U_r S_r V_r^T``) and the
            base weight becomes the residual ``W - U_r S_r V_r^T``; the layer starts equal to ``base_layer`` up to
            float rounding (docs/method.md §13). Not on a quantized or sharded base weight.
            ``"gradient_svd"`` (LoRA-GA-like, Wang et al. 2024, arXiv 2407.05000): A and B are the top-``r`` right
            and left singular vectors of the loss gradient of the base weight, set by :meth:`start_from_gradient`
            once that gradient is known (``AdaLoRACallback`` does it at the start of fit); E = 0, so the layer
            starts equal to ``base_layer`` exactly. Until then A and B are orthonormal placeholders.
        scaling: ``"alpha_over_r"`` (default: ``lora_alpha / (ranknum + 1e-5)``, the reference) or
            ``"alpha_over_sqrt_r"`` (rsLoRA, Kalajdzievski 2023, arXiv 2312.03732):
            ``lora_alpha / sqrt(ranknum + 1e-5)``.

    Attributes:
        lora_A: (r, in) right singular vectors, N(0, 0.02).
        lora_E: (r, 1) singular values, zeros, so the layer starts equal to ``base_layer``.
        lora_B: (out, r) left singular vectors, N(0, 0.02).
        ranknum: buffer holding float(r).
        rank_mask: boolean buffer (r,), the last mask applied by the rank allocator (True = kept).
            It travels with a weights-only checkpoint, so the final rank pattern is never lost.
        init_lora_A, init_lora_E, init_lora_B: with ``adapter_init="weight_svd"`` only: buffers holding the initial
            triplets, whose scaled product the base weight gave up (see :meth:`initial_delta`).
    """

    def __init__(
        self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
        autocast_adapter_dtype: bool = True,
        adapter_init: AdapterInit = "reference",
        scaling: Scaling = "alpha_over_r",
    ) -> None:
        super().__init__(base_layer, r, lora_alpha, lora_dropout, autocast_adapter_dtype)
        if adapter_init not in ADAPTER_INITS:
            raise ConfigError(f"adapter_init must be one of {list(ADAPTER_INITS)}, got {adapter_init!r}")
        check_scaling(scaling)
        self.scaling_rule = scaling
        self.adapter_init = adapter_init
        factory = self.adapter_factory()
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        if adapter_init in ("orthogonal", "gradient_svd"):
            # orthogonal_ makes the rows of an (r, in) matrix orthonormal when r <= in, the columns of an
            # (out, r) matrix when r <= out: A A^T = I and B^T B = I.
            nn.init.orthogonal_(self.lora_A)
            nn.init.orthogonal_(self.lora_B)
        else:
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        # A (1,)-tensor as in the reference: dividing by it (not by a Python float) keeps bitwise parity.
        self.register_buffer("ranknum", torch.full((1,), float(r), **factory))
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=factory["device"]))
        self.parameters_per_rank = self.in_features + self.out_features + 1  # a row of A, E_i, a column of B
        if adapter_init == "weight_svd":
            self._start_from_weight_svd()
        if adapter_init == "gradient_svd":
            self._check_gradient_start()

    # The init this layer started from (a loaded weight-SVD layer says so once its initial triplets are registered);
    # "weight_svd" layers carry INITIAL_TENSORS and a residual base weight. Class defaults serve instances unpickled
    # from before these existed.
    adapter_init: str = "reference"
    scaling_rule: str = "alpha_over_r"
    _residualised: bool = False

    def scale_denominator(self) -> torch.Tensor:
        """The tensor the scaled update is divided by: ``ranknum + 1e-5`` (the reference), or its square root under
        rsLoRA scaling. ``lora_alpha / scale_denominator()`` is the update's scale."""
        if self.scaling_rule == "alpha_over_sqrt_r":
            return torch.sqrt(self.ranknum + RANKNUM_EPS)
        return self.ranknum + RANKNUM_EPS

    def scale(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The update's scale ``lora_alpha / scale_denominator()`` as a (1,) tensor of ``dtype`` (float64 for exports
        and folds, which round once at the end)."""
        ranknum = self.ranknum.to(dtype) + RANKNUM_EPS
        return self.lora_alpha / (torch.sqrt(ranknum) if self.scaling_rule == "alpha_over_sqrt_r" else ranknum)

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) update ``B (A * E) * lora_alpha / (ranknum + 1e-5)`` (the rsLoRA denominator under
        ``scaling="alpha_over_sqrt_r"``)."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.lora_alpha / self.scale_denominator()

    # ------------------------------------------------------------------ weight-SVD start (docs/method.md §13)
    @torch.no_grad()
    def _start_from_weight_svd(self) -> None:
        """A, E, B from the top-``r`` singular triplets of the base weight; the base weight becomes the residual."""
        from adalora_pl.sharding import is_sharded

        if self.quantization is not None:
            raise ConfigError(
                f"adapter_init='weight_svd' needs a plain base weight to replace by its residual, but this base layer "
                f"is quantized ({quantized.describe(self.base_layer)}); use adapter_init 'reference' or 'orthogonal'"
            )
        weight = self.base_layer.weight
        if is_sharded(weight):
            raise ConfigError("adapter_init='weight_svd' cannot residualise a sharded (DTensor) base weight; use "
                              "another adapter_init (or DDP, where every rank holds whole weights)")
        if not weight.is_floating_point():
            raise ConfigError(f"adapter_init='weight_svd' needs a floating-point base weight, got {weight.dtype}")
        if self.r > min(self.in_features, self.out_features):
            raise ConfigError(
                f"adapter_init='weight_svd' takes r={self.r} singular triplets of a {self.out_features} x "
                f"{self.in_features} weight, which has at most {min(self.in_features, self.out_features)}; lower init_r"
            )
        scale = self.scale()
        if not torch.isfinite(scale).all() or (scale == 0).any():
            raise ConfigError(f"adapter_init='weight_svd' divides the singular values by the scale, which is "
                              f"{float(scale)} for lora_alpha={self.lora_alpha}; use a lora_alpha != 0")
        # float64 SVD: the factors are rounded once into the adapter's dtype, and the residual is computed from those
        # rounded factors, so that residual + update reconstructs W up to the weight dtype's rounding.
        w = self._orient(weight.detach()).to(torch.float64)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = self.r
        self.lora_A.copy_(vh[:r])
        self.lora_E.copy_((s[:r] / scale).view(r, 1))
        self.lora_B.copy_(u[:, :r])
        self.register_initial_triplets(self.lora_A.detach(), self.lora_E.detach(), self.lora_B.detach())
        self.residualise_base()

    # ------------------------------------------------------------------ gradient-SVD start (docs/method.md §13)
    def _check_gradient_start(self) -> None:
        """Refuse, at construction, a layer whose base weight cannot give the gradient :meth:`start_from_gradient`
        needs."""
        from adalora_pl.sharding import is_sharded

        weight = getattr(self.base_layer, "weight", None)
        if self.quantization is not None or weight is None or not weight.is_floating_point():
            raise ConfigError(
                "adapter_init='gradient_svd' needs the loss gradient of a float base weight, but this base layer is "
                f"{quantized.describe(self.base_layer) if self.quantization else type(self.base_layer).__name__}; "
                "use adapter_init 'reference' or 'orthogonal'"
            )
        if is_sharded(weight):
            raise ConfigError("adapter_init='gradient_svd' cannot take the SVD of a sharded (DTensor) weight's "
                              "gradient; use another adapter_init (or DDP, where every rank holds whole weights)")
        if self.r > min(self.in_features, self.out_features):
            raise ConfigError(
                f"adapter_init='gradient_svd' takes r={self.r} singular vectors of a {self.out_features} x "
                f"{self.in_features} gradient, which has at most {min(self.in_features, self.out_features)}; lower "
                "init_r"
            )

    @torch.no_grad()
    def start_from_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """Set A and B to the top-``r`` singular vectors of ``grad``, the loss gradient of the base weight (in the
        base weight's layout), and E to 0.

        With ``grad = U S V^T``: ``A = V_r^T``, ``B = U_r`` (float64 SVD, rounded once into the adapter's dtype). The
        layer's output is unchanged (E = 0), and the first gradient of the singular values on that loss is
        ``dL/dE_i = scale * u_i^T grad v_i = scale * s_i``: the largest any orthonormal factors can give, and the
        first steps move the update along the gradient's principal directions.

        Returns:
            the singular values of ``grad`` (float64, descending), for the caller's report.
        """
        g = self._orient(grad.detach()).to(torch.float64)
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        r = self.r
        self.lora_A.copy_(vh[:r])
        self.lora_B.copy_(u[:, :r])
        self.lora_E.zero_()
        return s

    @torch.no_grad()
    def register_initial_triplets(self, lora_a: torch.Tensor, lora_e: torch.Tensor, lora_b: torch.Tensor) -> None:
        """Record the initial triplets of a weight-SVD start (copies, in the adapter's dtype) as the buffers
        :data:`INITIAL_TENSORS`; :meth:`residualise_base` then takes their update out of the base weight.

        Used by the weight-SVD init itself, and by :func:`adalora_pl.io.load_adapter`, which rebuilds a saved layer
        from the saved triplets (not from a new SVD), so that the residual is the one training used.
        """
        factory = self.adapter_factory()
        for name, value in zip(INITIAL_TENSORS, (lora_a, lora_e, lora_b), strict=True):
            self.register_buffer(name, value.detach().to(**factory).clone())
        self.adapter_init = "weight_svd"

    def initial_delta(self) -> torch.Tensor | None:
        """The (out, in) update of the initial triplets, ``scale * B0 diag(E0) A0``, in float64: what a weight-SVD
        start took out of the base weight (so the pretrained weight is the base weight plus this). None for the
        other inits."""
        if self.adapter_init != "weight_svd":
            return None
        a, e, b = (getattr(self, name).detach().double() for name in INITIAL_TENSORS)
        return b @ (a * e) * self.scale()

    @torch.no_grad()
    def residualise_base(self) -> None:
        """Replace the base weight W by ``W - initial_delta()``, computed in float64 and rounded once (once per layer).

        Raises:
            RuntimeError: called twice, or on a layer without initial triplets.
        """
        if self.adapter_init != "weight_svd" or self._residualised:
            raise RuntimeError("residualise_base: the layer has no initial triplets, or its base weight is the "
                               "residual already")
        weight = self.base_layer.weight
        delta = self._orient(self.initial_delta()).to(weight.device)
        weight.copy_((weight.double() - delta).to(weight.dtype))
        self._residualised = True

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Load as usual; a weight-SVD layer whose loaded initial triplets differ from its own (a checkpoint of this
        model whose SVD was computed by another LAPACK) moves its base weight to the residual of the loaded ones, so
        that the base weight is always the pretrained W minus :meth:`initial_delta` (to float rounding). The base
        weight of a full state dict, loaded after this (children load after their parent), overrides it."""
        before = self.initial_delta() if self._residualised else None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if before is None:
            return
        after = self.initial_delta()
        if not torch.equal(before, after):
            with torch.no_grad():
                weight = self.base_layer.weight
                shift = self._orient(before - after).to(weight.device)
                weight.copy_((weight.double() + shift).to(weight.dtype))

    # The kept triplets' indices once the rank pattern is final (freeze_pattern); None while it may still change.
    _kept_index: torch.Tensor | None = None

    def freeze_pattern(self) -> None:
        """Declare the rank pattern final (AdaLoRA's last phase): the fused kernel then computes the kept triplets
        only, so that phase costs what the kept rank costs. Masked triplets contribute nothing either way (their E is
        zero); what changes is that their E receives a zero gradient (the reference computes one, and the allocator
        zeroes E again after each step, so only the optimizer's state of those E differs). The reference kernel ignores
        this. One host synchronization, here."""
        self._kept_index = torch.nonzero(self.rank_mask).view(-1)

    def thaw_pattern(self) -> None:
        """Undo :meth:`freeze_pattern`: every triplet is computed again."""
        self._kept_index = None

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        lora_a, lora_e, lora_b = self.lora_A, self.lora_E, self.lora_B
        kept = self._kept_index
        if kept is not None:
            # No special case for nothing kept: the rank-0 branch adds nothing, and A and B still get (zero) gradients,
            # so that AdamW moves them exactly as under the reference kernel (a None gradient would skip them).
            kept = kept.to(lora_a.device)
            lora_a, lora_e, lora_b = lora_a[kept], lora_e[kept], lora_b[:, kept]
        scale = self.lora_alpha / self.scale_denominator()
        return fused_adapted_linear(x, self.base_layer.weight, self.base_layer.bias, lora_a * lora_e, lora_b * scale,
                                    dropout_p=self._branch_dropout_p(), weight_in_out=self.fan_in_fan_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.merged and self.r > 0 and self._fused_applies(x):
            return self._fused_forward(x)
        result = self.base_layer(x)
        if self.merged or self.r == 0:
            return result
        x = x.to(self.lora_A.dtype)
        # Same operation order as the reference, so results match PEFT bitwise:
        # result += update * lora_alpha / (ranknum + 1e-5), fused into one pass where that is exact.
        update = self.lora_dropout(x) @ (self.lora_A * self.lora_E).T @ self.lora_B.T
        denominator = self.scale_denominator()
        if self.quantization is not None:
            # Out of place: bitsandbytes' 4-bit output is made inside its autograd Function, and an in-place add
            # into it is an autograd error in training (PEFT clones it). The same numbers as the in-place add:
            # summed in the wider dtype, rounded once into the base output's dtype.
            out = result + update * self.lora_alpha / denominator
            return out.to(result.dtype)
        # A float32 adapter on a half-precision base adds into the base output in place, rounding once (PEFT).
        return add_scaled(result, update, self.lora_alpha, denominator, fused=self.fuse_residual_add)

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v}" for k, v, default in (("adapter_init", self.adapter_init, "reference"),
                                                           ("scaling", self.scaling_rule, "alpha_over_r"))
                        if v != default)
        return super().extra_repr() + extra


class LoRALinear(AdapterLayer):
    """A frozen linear layer plus the LoRA update ``B A * lora_alpha / r`` (Hu et al., 2021).

    The baseline AdaLoRA is compared with; it shares the injection machinery with :class:`SVDLinear`.

    Args:
        base_layer: the ``nn.Linear`` (or GPT-2 ``Conv1D``) to adapt; its parameters are frozen.
        r: rank (> 0).
        lora_alpha: scaling numerator; the update is scaled by ``lora_alpha / r``.
        lora_dropout: dropout probability on the adapter branch only.
        autocast_adapter_dtype: float32 adapter tensors on a float16/bfloat16 base layer (default).
        scaling: ``"alpha_over_r"`` (default, ``lora_alpha / r``) or ``"alpha_over_sqrt_r"`` (rsLoRA,
            Kalajdzievski 2023, arXiv 2312.03732: ``lora_alpha / sqrt(r)``, PEFT's ``use_rslora``).

    Attributes:
        lora_A: (r, in), Kaiming-uniform init as in the LoRA reference code.
        lora_B: (out, r), zeros, so the layer starts equal to ``base_layer``.
    """

    def __init__(
        self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
        autocast_adapter_dtype: bool = True, scaling: Scaling = "alpha_over_r",
    ) -> None:
        if r <= 0:
            raise ConfigError(f"LoRA rank r must be > 0, got {r}")
        check_scaling(scaling)
        super().__init__(base_layer, r, lora_alpha, lora_dropout, autocast_adapter_dtype)
        self.scaling_rule = scaling
        factory = self.adapter_factory()
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    # Class default for instances unpickled from before the option existed.
    scaling_rule: str = "alpha_over_r"

    @property
    def scaling(self) -> float:
        """The update's scale: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` under rsLoRA scaling."""
        if self.scaling_rule == "alpha_over_sqrt_r":
            return self.lora_alpha / math.sqrt(self.r)
        return self.lora_alpha / self.r

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) update ``B A * scaling``."""
        return self.lora_B @ self.lora_A * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.merged and self._fused_applies(x):
            return fused_adapted_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A,
                                        self.lora_B * self.scaling, dropout_p=self._branch_dropout_p(),
                                        weight_in_out=self.fan_in_fan_out)
        result = self.base_layer(x)
        if self.merged:
            return result
        x = x.to(self.lora_A.dtype)
        update = self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T
        if update.dtype != result.dtype:  # float32 adapter on a half-precision base: add, then round once
            return (result + update * self.scaling).to(result.dtype)
        # result + update * scaling, fused into one pass where that is exact.
        return add_scaled(result, update, self.scaling, fused=self.fuse_residual_add)

    def extra_repr(self) -> str:
        extra = f", scaling={self.scaling_rule}" if self.scaling_rule != "alpha_over_r" else ""
        return super().extra_repr() + extra
