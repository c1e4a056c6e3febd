"""Checkpoints of the task modules: what an adapter-only checkpoint holds and how it is checked on loading, and
from a Lightning checkpoint to a shippable artifact (``python cli.py export``).

An adapter-only checkpoint (``checkpoint_weights="adapters"``, the task modules' default) holds in its
``state_dict`` what trains (the adapters, the trained heads) and the adapters' own buffers (``rank_mask``,
``ranknum``), never the frozen base; everything else (optimizer, schedulers, loops, callback state) is as
Lightning writes it. It records the base it belongs to (:data:`BASE_KEY`): the backbone, its revision, the
quantization settings and a fingerprint of the frozen weights (:func:`base_fingerprint`). Loading rebuilds the base
from the backbone, checks it against that record and the checkpoint's keys against the module
(:func:`check_adapter_checkpoint`), and loads the rest.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from adalora_pl.config import AdaLoRAConfig
from adalora_pl.errors import ConfigError, MissingFileError
from adalora_pl.injection import find_adapters
from adalora_pl.io.adapter import save_adapter
from adalora_pl.io.lora import export_lora
from adalora_pl.io.peft import export_peft
from adalora_pl.io.surgery import check_pruned_triplets, merge_adapters
from adalora_pl.module import CONFIG_KEY, MODULE_CLASS_KEY

log = logging.getLogger(__name__)

ExportFormat = Literal["adapter", "peft", "lora", "merged"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)
#: The task modules a checkpoint of ``cli.py fit`` can name, for the message when it names another.
TASK_MODULES = ("adalora_pl.tasks.glue_module.GLUEClassifier", "adalora_pl.tasks.qa_module.QuestionAnswering",
                "adalora_pl.tasks.summarization_module.Seq2SeqSummarizer",
                "adalora_pl.tasks.causal_lm_module.CausalLMModule")


# ---------------------------------------------------------------------------------------- adapter-only checkpoints
#: Checkpoint entry saying what its ``state_dict`` holds: ``"adapters"`` (what trains and the adapters' buffers) or
#: ``"full"`` (every weight). Checkpoints written before the entry existed hold every weight.
WEIGHTS_KEY = "adalora_pl_checkpoint_weights"
#: Checkpoint entry recording the frozen base an adapter-only checkpoint belongs to (:func:`base_record`).
BASE_KEY = "adalora_pl_base"
#: Values read from each frozen floating-point tensor for the fingerprint (evenly spaced, first and last included).
FINGERPRINT_SAMPLES = 16
#: The hyperparameters that decide how the frozen base is stored (see :func:`quantization_settings`).
QUANTIZATION_HPARAMS = ("quantization", "quantization_compute_dtype", "double_quant")


def split_state_keys(module: nn.Module, state: Mapping[str, Any] | None = None) -> tuple[list[str], list[str]]:
    """``(kept, frozen)``: the keys of ``module.state_dict()`` an adapter-only checkpoint holds, and the others.

    Kept: every trainable parameter (adapters, trained heads) and every entry of an adapter layer outside its
    ``base_layer`` (the adapters' buffers ``rank_mask`` and ``ranknum``, which the schedule changes without
    gradients). Frozen: the rest, the pretrained base, which loading rebuilds from the backbone.

    Args:
        module: the LightningModule (keys as Lightning writes them, ``model.`` first).
        state: ``module.state_dict(keep_vars=True)`` when the caller has it already.
    """
    state = module.state_dict(keep_vars=True) if state is None else state
    adapters = set(find_adapters(module))
    kept, frozen = [], []
    for key, value in state.items():
        parts = key.split(".")
        # The adapter layer the key is inside, if any: the longest module path in `adapters` that prefixes it.
        depth = next((i for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in adapters), None)
        own = depth is not None and parts[depth] != "base_layer"
        trainable = isinstance(value, nn.Parameter) and value.requires_grad
        (kept if own or trainable else frozen).append(key)
    return kept, frozen


def plain_float(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds its values as a plain floating-point tensor.

    Quantized weights are not: bitsandbytes packs them into uint8/int8 parameters and torchao into tensor
    subclasses, whose storage depends on the quantizer and its version rather than on the pretrained values.
    """
    data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    return type(data) is torch.Tensor and data.dtype.is_floating_point and not data.is_meta and data.numel() > 0


def _samples(tensor: torch.Tensor) -> torch.Tensor:
    """:data:`FINGERPRINT_SAMPLES` values of ``tensor`` at evenly spaced flat positions, as float64 on the CPU."""
    tensor = tensor.detach()
    if tensor.dim() == 0:
        return tensor.reshape(1).expand(FINGERPRINT_SAMPLES).to("cpu", torch.float64)
    flat = torch.linspace(0, tensor.numel() - 1, FINGERPRINT_SAMPLES, dtype=torch.float64).round().long()
    # Indexing by coordinates reads 16 values; flatten() would copy a non-contiguous tensor whole.
    index = torch.unravel_index(flat.to(tensor.device), tensor.shape)
    return tensor[index].to("cpu", torch.float64)


def base_fingerprint(module: nn.Module, state: Mapping[str, torch.Tensor] | None = None,
                     frozen: list[str] | None = None) -> dict[str, Any]:
    """A cheap fingerprint of the frozen base: its frozen keys, and for every frozen parameter or buffer of ``module``
    that is a plain floating-point tensor (:func:`plain_float`), its name, shape, dtype and
    :data:`FINGERPRINT_SAMPLES` of its values.

    Why this: it reads a few values per tensor (a few hundred tensors for a 7B model: milliseconds, where a checksum
    of every weight would read all 14 GB at each save and each load), yet it covers every tensor of the base, so a
    base that differs anywhere as a whole (another checkpoint, another seed, a resized vocabulary, a fine-tuned
    variant, whose training moves essentially every weight) is caught. Values are kept, not summed, so that two
    dtypes of the same base (a ``bf16-true`` run saved, a float32 module loads) compare up to one rounding (see
    :func:`fingerprint_differences`). Quantized weights are left out: their packed storage is the quantizer's; the
    embeddings, norms and heads a quantizer leaves in floating point are in, and the quantization settings are
    compared on their own. So are the entries a quantized layer adds to its state dict besides its parameters
    (bitsandbytes' ``absmax``, ``quant_map``, ``SCB``): they exist only once the layer has quantized its weights.

    Args:
        module: the LightningModule.
        state: ``module.state_dict(keep_vars=True)`` when the caller has it already.
        frozen: the frozen keys (:func:`split_state_keys`) when the caller has them already.
    """
    state = module.state_dict(keep_vars=True) if state is None else state
    frozen = split_state_keys(module, state)[1] if frozen is None else frozen
    registered = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    registered.update(name for name, _ in module.named_buffers(remove_duplicate=False))
    names, shapes, dtypes, samples = [], [], [], []
    for key in frozen:
        tensor = state[key]
        if key not in registered or not plain_float(tensor):
            continue
        names.append(key)
        shapes.append(list(tensor.shape))
        dtypes.append(str(tensor.dtype).removeprefix("torch."))
        samples.append(_samples(tensor))
    stacked = torch.stack(samples) if samples else torch.zeros(0, FINGERPRINT_SAMPLES, dtype=torch.float64)
    return {"keys": list(frozen), "names": names, "shapes": shapes, "dtypes": dtypes, "samples": stacked}


def _same_values(a: torch.Tensor, a_dtype: str, b: torch.Tensor, b_dtype: str) -> bool:
    """Whether two fingerprint rows hold the same weights, read in dtypes ``a_dtype`` and ``b_dtype``."""
    if a_dtype == b_dtype:
        return torch.equal(a, b)
    # One side was rounded to another dtype (a bf16-true or 16-true run): equal up to one rounding step of the coarser
    # dtype, and below the smallest normal number (fp16 flushes tiny weights) equal up to that.
    infos = [torch.finfo(getattr(torch, dtype)) for dtype in (a_dtype, b_dtype)]
    rtol, atol = max(i.eps for i in infos), max(i.smallest_normal for i in infos)
    return torch.allclose(a, b, rtol=rtol, atol=atol)


def _examples(names: list[str]) -> str:
    return ", ".join(names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")


def fingerprint_differences(saved: Mapping[str, Any], live: Mapping[str, Any]) -> list[str]:
    """What differs between the fingerprint a checkpoint saved and the live base's, in words (empty: the same).

    A frozen key of the saved base that the live one lacks is a difference; a tensor fingerprinted on one side only
    (quantized, or sharded across ranks, on the other) is not compared, as the quantization settings are compared on
    their own. Keys the live base has beyond the saved one's are left to the key check of loading: they matter only
    where the module trains them, and the checkpoint then lacks them.
    """
    live_rows = {name: i for i, name in enumerate(live["names"])}
    live_keys = set(live["keys"])
    absent = [key for key in saved["keys"] if key not in live_keys]
    reshaped, changed = [], []
    for i, name in enumerate(saved["names"]):
        j = live_rows.get(name)
        if j is None:
            continue
        if list(saved["shapes"][i]) != list(live["shapes"][j]):
            reshaped.append(f"{name} {tuple(live['shapes'][j])} here, {tuple(saved['shapes'][i])} when saved")
        elif not _same_values(saved["samples"][i], saved["dtypes"][i], live["samples"][j], live["dtypes"][j]):
            changed.append(name)
    compared = len(set(saved["names"]) & set(live_rows))
    if saved["names"] and not compared and not absent:
        log.warning("none of the %d fingerprinted frozen tensors of the checkpoint's base could be compared with this "
                    "base (quantized or sharded here): its weights are not checked", len(saved["names"]))
    differences = []
    if reshaped:
        differences.append(f"{len(reshaped)} frozen tensors have another shape ({'; '.join(reshaped[:2])})")
    if changed:
        differences.append(f"the values of {len(changed)} of {compared} frozen tensors differ ({_examples(changed)})")
    if absent:
        differences.append(f"{len(absent)} frozen tensors of the saved base are not in this one ({_examples(absent)})")
    return differences


def quantization_settings(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """How the base is stored, from a module's hyperparameters: ``{"quantization": "none"}`` for a plain base (the
    other settings then change nothing), every :data:`QUANTIZATION_HPARAMS` entry for a quantized one."""
    method = hparams.get("quantization", "none") or "none"
    if method == "none":
        return {"quantization": "none"}
    return {key: hparams.get(key) for key in QUANTIZATION_HPARAMS}


def _settings(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def base_record(module: nn.Module, backbone: str, revision: str | None, hparams: Mapping[str, Any],
                state: Mapping[str, torch.Tensor], frozen: list[str]) -> dict[str, Any]:
    """What an adapter-only checkpoint records of its base (:data:`BASE_KEY`).

    Args:
        module: the LightningModule.
        backbone: the hub id or folder the base was loaded from.
        revision: its revision, where transformers knows it (``config._commit_hash``); None for a local folder.
        hparams: the module's hyperparameters (for :func:`quantization_settings`).
        state: ``module.state_dict(keep_vars=True)``.
        frozen: the frozen keys (:func:`split_state_keys`).
    """
    return {"backbone": backbone, "revision": revision, "quantization": quantization_settings(hparams),
            "fingerprint": base_fingerprint(module, state, frozen)}


def keep_trained_state(module: nn.Module, checkpoint: dict[str, Any], backbone: str, revision: str | None,
                       hparams: Mapping[str, Any]) -> None:
    """Make ``checkpoint`` adapter-only, in place: drop the frozen base from its ``state_dict``, record the base.

    Called from the module's ``on_save_checkpoint``, after the callbacks' (AdaLoRACallback has zeroed the masked
    singular values in the entries kept here).
    """
    state = module.state_dict(keep_vars=True)
    kept, frozen = split_state_keys(module, state)
    keep = set(kept)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
    checkpoint[WEIGHTS_KEY] = "adapters"
    checkpoint[BASE_KEY] = base_record(module, backbone, revision, hparams, state, frozen)


def check_adapter_checkpoint(module: nn.Module, checkpoint: Mapping[str, Any], backbone: str,
                             hparams: Mapping[str, Any], source: str = "the checkpoint") -> set[str]:
    """Check an adapter-only checkpoint against ``module``, whose base was built from ``backbone``; return the keys
    it may leave out (the frozen base's, which ``module`` has already).

    The base must be the one the checkpoint records (the same quantization settings, the same fingerprint); every
    key in the checkpoint must be one of the module's, with its shape, and every key of the module it lacks must be
    a frozen one.

    Raises:
        ConfigError: one line naming ``source``, the backbone, and what differs.
    """
    record = checkpoint.get(BASE_KEY)
    if not isinstance(record, Mapping) or "fingerprint" not in record:
        raise ConfigError(f"{source} holds only adapters ({WEIGHTS_KEY}='adapters') but no record of its base "
                          f"({BASE_KEY!r}); it was not written by an adalora_pl task module")
    state = module.state_dict(keep_vars=True)
    kept, frozen = split_state_keys(module, state)
    saved_quantization, quantization = record.get("quantization") or {}, quantization_settings(hparams)
    differences = []
    if dict(saved_quantization) != quantization:
        differences.append(f"the base is loaded with {_settings(quantization)} here, with "
                           f"{_settings(saved_quantization)} when saved")
    differences += fingerprint_differences(record["fingerprint"], base_fingerprint(module, state, frozen))
    if differences:
        revision = f" at revision {record['revision']}" if record.get("revision") else ""
        raise ConfigError(
            f"{source} does not match the backbone {backbone!r}: {'; '.join(differences)}. It holds only the "
            f"trained weights (checkpoint_weights='adapters') for the base {record.get('backbone')!r}{revision}; "
            "load it with that base"
        )
    saved = checkpoint["state_dict"]
    unexpected = [k for k in saved if k not in state]
    missing = [k for k in kept if k not in saved]
    mismatched = [f"{k}: {tuple(saved[k].shape)} vs {tuple(state[k].shape)}" for k in saved
                  if k in state and tuple(saved[k].shape) != tuple(state[k].shape)]
    if unexpected or missing or mismatched:
        raise ConfigError(
            f"{source} does not match the module built from its settings on the backbone {backbone!r}: "
            f"{len(mismatched)} tensors of another shape (checkpoint vs model, e.g. {mismatched[:2]}), {len(missing)} "
            f"trained tensors missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    return set(frozen)


# ---------------------------------------------------------------------------------------- export
def resolve_module_class(class_path: str) -> type:
    """The task module class a checkpoint names, or a ConfigError."""
    module_name, _, class_name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(
            f"the checkpoint's module class {class_path!r} cannot be imported ({err}); the task modules are "
            f"{list(TASK_MODULES)}"
        ) from err


def torch_archive_problem(path: Path) -> str | None:
    """Why ``path`` is not a ``torch.save`` zip archive (None when it is one), read without unpickling.

    Every checkpoint Lightning writes is such an archive: one top-level folder holding ``data.pkl``.
    """
    if not zipfile.is_zipfile(path):
        return "not a zip archive, as torch.save writes"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        return f"a damaged zip archive ({err})"
    if not any(name.count("/") == 1 and name.endswith("/data.pkl") for name in names):
        return "a zip archive without the data.pkl entry torch.save writes"
    return None


def _first_line(err: BaseException) -> str:
    # torch's unpickling errors span many lines (and suggest weights_only=False): keep the CLI's one line.
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


#: The files of a distributed checkpoint folder (ModelParallelStrategy, torch.distributed.checkpoint): DCP's index and
#: Lightning's metadata (everything but the weights and optimizer states).
DISTRIBUTED_CHECKPOINT_FILES = (".metadata", "meta.pt")


def is_distributed_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is the folder of a distributed checkpoint (each rank's shards in ``__<rank>_0.distcp``)."""
    path = Path(path)
    return path.is_dir() and all((path / name).is_file() for name in DISTRIBUTED_CHECKPOINT_FILES)


def read_distributed_checkpoint(path: Path) -> dict[str, Any]:
    """A distributed checkpoint folder as one checkpoint dict (whole tensors on CPU, in one process): what a
    single-process fit would have written, for export. Its metadata file is checked and loaded weights-only, as
    :func:`read_checkpoint` loads a file."""
    problem = torch_archive_problem(path / "meta.pt")
    if problem is not None:
        raise ConfigError(f"{path} is not a Lightning distributed checkpoint: meta.pt {problem}")
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    try:
        torch.load(path / "meta.pt", map_location="cpu", weights_only=True)  # refuses arbitrary pickles first
        return _load_distributed_checkpoint(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ConfigError(f"{path}: the distributed checkpoint cannot be read safely ({_first_line(err)})") from err


def read_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint on CPU without unpickling arbitrary objects.

    The file must be a ``torch.save`` zip archive (checked from its directory, before anything is read as a
    pickle), and it is then loaded with ``weights_only=True``, so a file that is not a checkpoint (a README,
    a pickle of arbitrary objects) fails with one clear line instead of being unpickled.

    Raises:
        adalora_pl.errors.MissingFileError: no file at ``ckpt_path`` (a FileNotFoundError too).
        ConfigError: the file is not a Lightning checkpoint.
    """
    path = Path(ckpt_path)
    if is_distributed_checkpoint(path):
        return read_distributed_checkpoint(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a Lightning checkpoint file (pass the .ckpt file, or the folder "
                          "of a distributed checkpoint written by ModelParallelStrategy)")
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    problem = torch_archive_problem(path)
    if problem is not None:
        raise ConfigError(f"{path} is not a Lightning checkpoint: {problem}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ConfigError(
            f"{path} is not a Lightning checkpoint this tool can read safely (weights-only loading failed: "
            f"{_first_line(err)})"
        ) from err
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{path} is not a Lightning checkpoint: it holds a {type(ckpt).__name__}, not a dict")
    return ckpt


def load_task_module(ckpt_path: str | Path):
    """Rebuild the task module a checkpoint was saved from (backbone from its saved hyperparameters) and load its
    weights: all of them from a full checkpoint, the trained ones from an adapter-only checkpoint, whose base must
    be the one it records (:func:`check_adapter_checkpoint`).

    Returns:
        ``(module, checkpoint)``.
    """
    ckpt = read_checkpoint(ckpt_path)
    hparams = ckpt.get("hyper_parameters")
    class_path = ckpt.get(MODULE_CLASS_KEY)
    if hparams is not None:  # LightningCLI adds private keys such as "_class_path" and "_instantiator"
        hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
    if class_path is None or hparams is None or "state_dict" not in ckpt:
        raise ConfigError(
            f"{ckpt_path} was not written by an adalora_pl task module (missing {MODULE_CLASS_KEY!r}, "
            "'hyper_parameters' or 'state_dict'); export works on checkpoints of `python cli.py fit`"
        )
    module = resolve_module_class(class_path)(**hparams)
    if ckpt.get(WEIGHTS_KEY) == "adapters":
        # What the module's on_load_checkpoint does for a Lightning load: check the base and the keys, then let
        # load_state_dict leave out the frozen base (and nothing else).
        module.prepare_checkpoint_load(ckpt, source=str(ckpt_path))
        module.load_state_dict(ckpt["state_dict"])
        return module, ckpt
    state, own = ckpt["state_dict"], module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
                  if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise ConfigError(
            f"{ckpt_path} does not match the backbone {hparams.get('backbone')!r}: {len(mismatched)} tensors of "
            f"another shape (checkpoint vs model, e.g. {mismatched[:2]}), {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    module.load_state_dict(state)
    return module, ckpt


def run_config(ckpt: dict[str, Any], ckpt_path: str | Path) -> AdaLoRAConfig:
    """The :class:`~adalora_pl.config.AdaLoRAConfig` a fit checkpoint ran with, resolved (steps, total_step).

    The callback records it (``"settings"`` in its state) when it ran the schedule; otherwise the module's own
    (``adalora_config``), which knows no total number of steps.
    """
    states = (ckpt.get("callbacks") or {}).values()
    saved = next((s["settings"] for s in states if isinstance(s, dict) and isinstance(s.get("settings"), dict)), None)
    if saved is None:
        saved = ckpt.get(CONFIG_KEY)
    if saved is None:
        raise ConfigError(f"{ckpt_path} records no AdaLoRA settings; PEFT export needs a checkpoint of an AdaLoRA fit")
    return AdaLoRAConfig.from_dict(saved)


def output_folder_problem(output: str | Path, *, overwrite: bool, overwrite_hint: str = "pass overwrite=True"
                          ) -> str | None:
    """Why an export must not write to ``output``, or None: it is a file, or (unless ``overwrite``) a folder that
    already holds files. A missing or empty folder is fine.

    Args:
        output: The export's output folder.
        overwrite: Writing into a folder with files is allowed (same names are replaced, the others kept).
        overwrite_hint: How the caller allows it, for the message (``"pass --overwrite"`` on the command line).
    """
    path = Path(output)
    if path.exists() and not path.is_dir():
        return f"{output} is a file; the export writes a folder"
    if overwrite or not path.is_dir():
        return None
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return None
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (f"{output} already holds files ({shown}); choose another folder, or {overwrite_hint} to write into it "
            "(files of the same name are replaced, the others kept)")


def export_checkpoint(
    ckpt_path: str | Path, fmt: ExportFormat, output: str | Path, *, zero_masked: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the adapters of a fit checkpoint as ``adapter`` (safetensors + JSON), ``peft`` (an AdaLoRA folder
    ``PeftModel.from_pretrained`` loads), ``lora`` (the same adapters folded into a standard PEFT LoRA folder, see
    :func:`~adalora_pl.io.lora.export_lora`) or ``merged`` (a plain transformers model, adapters folded in).

    Every format holds the model its rank pattern describes: a checkpoint whose pruned triplets
    (``rank_mask`` False) still have a nonzero ``lora_E`` is refused, unless ``zero_masked=True`` zeroes them
    first (see :func:`adalora_pl.io.surgery.check_pruned_triplets`).

    ``output`` must be a new or empty folder, unless ``overwrite=True`` (files of the same name are then replaced,
    the others kept): an export never silently writes over another one.

    Raises:
        FileNotFoundError: no file at ``ckpt_path``.
        ConfigError: ``output`` is a file, or a folder with files and ``overwrite`` is False (checked first); not a
            checkpoint of ``cli.py fit``, or one that cannot be exported in ``fmt``.
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"format must be one of {list(EXPORT_FORMATS)}, got {fmt!r}")
    problem = output_folder_problem(output, overwrite=overwrite)
    if problem is not None:
        raise ConfigError(f"output {problem}")
    module, ckpt = load_task_module(ckpt_path)
    model, h = module.model, dict(ckpt["hyper_parameters"])
    if not find_adapters(model) and fmt != "merged":
        raise ConfigError(f"{ckpt_path} has no adapters (method={h.get('method')!r}); use --format merged")
    check_pruned_triplets(model, f"{ckpt_path}", zero_masked=zero_masked)
    output = Path(output)
    if fmt == "adapter":
        save_adapter(model, output, config={**h, "backbone": h.get("backbone")})
    elif fmt == "peft":
        export_peft(model, output, config=run_config(ckpt, ckpt_path), base_model_name_or_path=h.get("backbone"))
    elif fmt == "lora":
        export_lora(model, output, base_model_name_or_path=h.get("backbone"))
    else:
        merged = merge_adapters(model)
        merged.save_pretrained(output)
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(h["backbone"]).save_pretrained(output)
        except (OSError, ValueError) as err:  # no tokenizer next to a local backbone: the weights still count
            log.warning("could not copy the tokenizer of %s: %s", h.get("backbone"), err)
    size = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    log.info("exported %s as %s to %s (%.1f MB)", ckpt_path, fmt, output, size / 1e6)
    print(f"exported {fmt} to {output} ({size / 1e6:.2f} MB)")
    return output
