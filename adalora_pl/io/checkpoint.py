"""From a Lightning checkpoint of a task module to a shippable artifact (``python cli.py export``)."""

from __future__ import annotations

import importlib
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any, Literal, get_args

import torch

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
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a Lightning checkpoint file (pass the .ckpt file)")
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
    """Rebuild the task module a checkpoint was saved from (backbone from its saved hyperparameters)."""
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
