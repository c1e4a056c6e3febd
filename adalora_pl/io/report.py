"""Pictures of a finished allocation: the rank heatmap of the paper's figure and the budget curve.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no display, no global backend change), so
they work on headless machines and inside training processes.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adalora_pl.errors import ConfigError, MissingFileError
from adalora_pl.injection import split_layer_path
from adalora_pl.io._common import read_json
from adalora_pl.io.peft import rank_pattern_module_path

RankValue = Sequence[bool] | int


def _rank_of(value: RankValue) -> int:
    if isinstance(value, bool):
        raise TypeError("a rank_pattern value is a list of booleans (or a kept rank as int), not a bool")
    if isinstance(value, int):
        return value
    if hasattr(value, "tolist"):  # a tensor or array
        value = value.tolist()
    return sum(bool(v) for v in value)


def _stack_labels(prefixes: list[str]) -> dict[str, str]:
    """Short names for the layer stacks: the prefixes with their common leading and trailing parts removed
    (``model.encoder.layers`` / ``model.decoder.layers`` -> ``encoder`` / ``decoder``)."""
    split = [p.split(".") if p else [] for p in prefixes]
    lead = 0
    while all(len(s) > lead for s in split) and len({s[lead] for s in split}) == 1:
        lead += 1
    trail = 0
    while all(len(s) - lead > trail for s in split) and len({s[len(s) - 1 - trail] for s in split}) == 1:
        trail += 1
    labels = {}
    for prefix, s in zip(prefixes, split, strict=True):
        core = s[lead : len(s) - trail] or s or ["layers"]
        labels[prefix] = ".".join(core)
    return labels


def rank_table(
    rank_pattern: Mapping[str, RankValue],
) -> tuple[list[int | str], list[str], list[list[int | None]]]:
    """Arrange a rank pattern as a layers x module-types table of kept ranks.

    Args:
        rank_pattern: module path (our names, or PEFT's ``<path>.lora_E`` keys) -> one boolean per initial
            triplet (True = kept), or directly the kept rank as an int.

    Returns:
        ``(layers, module_types, ranks)``:

        - ``layers``: row labels. The layer index is the last integer component of the path
          (``encoder.layer.3.attention.self.query`` -> 3). With one stack of layers these are ints; with
          several (BART's encoder and decoder) they are strings ``"<stack>.<index>"`` such as
          ``"encoder.0"`` and ``"decoder.0"``, stacks in order of first appearance. Paths without an
          integer go to a last row ``"other"``.
        - ``module_types``: column labels, the path after the layer index (``attention.self.query``), in
          order of first appearance.
        - ``ranks``: ``ranks[i][j]`` is the kept rank of module type j in layer i, None where that layer
          has no such module (BART's encoder has no ``encoder_attn``).
    """
    cells: dict[tuple[str, int | None], dict[str, int]] = {}
    prefixes: list[str] = []
    types: list[str] = []
    for key, value in rank_pattern.items():
        prefix, index, module_type = split_layer_path(rank_pattern_module_path(key))
        if index is not None and prefix not in prefixes:
            prefixes.append(prefix)
        if module_type not in types:
            types.append(module_type)
        row = cells.setdefault((prefix, index), {})
        if module_type in row:
            raise ValueError(f"rank_pattern has two entries for layer {index} module {module_type!r} ({key!r})")
        row[module_type] = _rank_of(value)

    rows = sorted(
        (k for k in cells if k[1] is not None), key=lambda k: (prefixes.index(k[0]), k[1])
    )
    if len(prefixes) <= 1 and not any(k[1] is None for k in cells):
        labels: list[int | str] = [k[1] for k in rows]
    else:
        names = _stack_labels(prefixes)
        labels = [f"{names[k[0]]}.{k[1]}" if len(prefixes) > 1 else str(k[1]) for k in rows]
    others = [k for k in cells if k[1] is None]
    if others:
        rows.append(others[0])
        labels.append("other")
        merged: dict[str, int] = {}
        for k in others:
            merged.update(cells[k])
        cells[others[0]] = merged
    ranks = [[cells[k].get(t) for t in types] for k in rows]
    return labels, types, ranks


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def save_rank_heatmap(
    rank_pattern: Mapping[str, RankValue],
    path_png: str | Path,
    title: str = "Final rank of each adapted matrix",
    *,
    cmap: str = "YlGnBu",
    dpi: int = 150,
) -> tuple[list[int | str], list[str], list[list[int | None]]]:
    """Draw the kept ranks as a heatmap (rows = layers, columns = module types, value written in each cell),
    in the manner of the AdaLoRA paper's rank-distribution figure, and save it as PNG.

    Returns:
        The table from :func:`rank_table` that was drawn.
    """
    import numpy as np

    layers, types, ranks = rank_table(rank_pattern)
    if not layers:
        raise ValueError("rank_pattern is empty: nothing to draw")
    data = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in row] for row in ranks], dtype=float))
    vmax = max(1.0, float(data.max()))

    width = 1.6 + 1.05 * len(types)
    height = 1.4 + 0.42 * len(layers)
    figure = _new_figure(width, height)
    ax = figure.add_subplot(1, 1, 1)
    import matplotlib

    colormap = matplotlib.colormaps[cmap].with_extremes(bad="#eeeeee")  # cells without a module: light grey
    image = ax.imshow(data, cmap=colormap, vmin=0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(types)))
    ax.set_xticklabels(types, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(label) for label in layers], fontsize=8)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    for i, row in enumerate(ranks):
        for j, value in enumerate(row):
            if value is None:
                continue
            dark = value > 0.6 * vmax
            ax.text(j, i, str(value), ha="center", va="center", fontsize=8, color="white" if dark else "black")
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="kept rank")
    figure.tight_layout()
    path_png = Path(path_png)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path_png, dpi=dpi)
    return layers, types, ranks


def save_budget_curve(
    steps: Sequence[int],
    budgets: Sequence[float],
    path_png: str | Path,
    *,
    title: str = "Total rank budget",
    dpi: int = 150,
) -> Path:
    """Plot the total budget (kept triplets over all layers) against the optimizer step and save it as PNG."""
    steps, budgets = list(steps), list(budgets)
    if len(steps) != len(budgets):
        raise ValueError(f"steps ({len(steps)}) and budgets ({len(budgets)}) differ in length")
    if not steps:
        raise ValueError("no budget values to plot")
    figure = _new_figure(5.0, 3.2)
    ax = figure.add_subplot(1, 1, 1)
    ax.plot(steps, budgets, color="tab:blue", linewidth=1.5, drawstyle="steps-post")
    ax.set_xlabel("step")
    ax.set_ylabel("budget (kept triplets)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    figure.tight_layout()
    path_png = Path(path_png)
    path_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path_png, dpi=dpi)
    return path_png


__all__ = ["rank_table", "read_rank_pattern", "save_budget_curve", "save_rank_heatmap", "write_rank_report"]


def read_rank_pattern(path: str | Path) -> dict[str, int]:
    """The kept rank of every module in a ``rank_pattern.json`` that :func:`write_rank_report` wrote (the end of an
    AdaLoRA fit): ``{module path: rank}``, paths as the file names them.

    Each entry of the file's ``"modules"`` is ``{"rank": k, "mask": [bool] * init_r}``; the rank is ``k`` (which
    must be the number of True in ``mask`` where both are given).

    Raises:
        MissingFileError: no file at ``path``.
        ConfigError: not JSON, not in this format, or a rank that is not an integer >= 0; one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"rank_pattern file not found: {path}")
    try:
        payload = read_json(path)
    except ValueError as err:  # not JSON, or not an object: the reader's message names the file
        raise ConfigError(f"rank_pattern {err}") from None
    modules = payload.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise ConfigError(f"rank_pattern {path} has no \"modules\" entries; expected the rank_pattern.json an AdaLoRA "
                          "fit writes ({\"modules\": {path: {\"rank\": k, \"mask\": [...]}}})")
    ranks: dict[str, int] = {}
    for name, entry in modules.items():
        rank = entry.get("rank") if isinstance(entry, dict) else None
        mask = entry.get("mask") if isinstance(entry, dict) else None
        if rank is None and isinstance(mask, list):
            rank = sum(bool(m) for m in mask)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ConfigError(f"rank_pattern {path}: module {name!r} has rank {rank!r}; expected an integer >= 0")
        if isinstance(mask, list) and sum(bool(m) for m in mask) != rank:
            raise ConfigError(f"rank_pattern {path}: module {name!r} has rank {rank} but its mask keeps "
                              f"{sum(bool(m) for m in mask)}")
        ranks[name] = rank
    return ranks


def write_rank_report(allocator: Any, directory: str | Path, file_name: str = "rank_pattern.json",
                      logger: Any = None) -> Path:
    """What a finished allocation leaves in the log dir: the rank pattern as JSON, the heatmap and the planned
    budget curve as PNG (and, with a TensorBoard logger, as its images).

    The JSON is written first; a picture that cannot be drawn (no fonts, a broken matplotlib) is a warning naming
    the JSON, never an error: the pattern is what exports and users read.

    Args:
        allocator: the :class:`~adalora_pl.allocator.RankAllocator` of the run.
        directory: the log dir.
        file_name: name of the JSON file.
        logger: the Trainer's logger; its ``experiment.add_image`` receives the pictures when it has one.

    Returns:
        The path of the JSON file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pattern = allocator.rank_pattern()
    s = allocator.schedule
    payload = {
        "schedule": {
            "init_budget": s.init_budget, "target_budget": s.target_budget, "tinit": s.tinit, "tfinal": s.tfinal,
            "total_step": s.total_step, "delta_t": s.delta_t, "frozen": allocator.frozen,
            "last_step": allocator.last_step,
        },
        "total_rank": sum(sum(m) for m in pattern.values()),
        "modules": {name: {"rank": sum(mask), "mask": mask} for name, mask in pattern.items()},
    }
    path = directory / file_name
    path.write_text(json.dumps(payload, indent=1))
    try:
        heatmap, curve = directory / "rank_heatmap.png", directory / "budget_curve.png"
        save_rank_heatmap(pattern, heatmap, title=f"Final ranks (total {payload['total_rank']})")
        steps = list(range(s.total_step))
        save_budget_curve(steps, [s.budget_at(t) for t in steps], curve)
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            import matplotlib.image

            for tag, png in (("adalora/rank_heatmap", heatmap), ("adalora/budget_curve", curve)):
                experiment.add_image(tag, matplotlib.image.imread(png)[..., :3], dataformats="HWC")
    except Exception as err:  # a picture is never worth a failed fit: the pattern is already on disk
        warnings.warn(f"AdaLoRA: could not draw the allocation report ({type(err).__name__}: {err}); the rank "
                      f"pattern is in {path}", UserWarning, stacklevel=2)
    return path
