"""``python -m bundle pack``: the bundle as a MONAI bundle zip, ``dist/<name>_v<version>.zip``.

The zip holds one top-level folder ``<name>/`` with what a user needs to run the bundle: the zoo's ``configs/``,
``scripts/``, ``models/``, ``docs/`` and ``LICENSE``, and ``bundle/``, the command line its docs use (demo data,
datalists, PACS inference, export, benchmarks); not the repository's ``Makefile``, tests or CI. That is the
layout ``monai.bundle.download(name=<name>, url=...)`` extracts into ``<bundle_dir>/<name>/`` (it saves the download
as ``<bundle_dir>/<name>.zip`` and unzips it next to itself) and the one MONAI Label's ``monaibundle`` app expects
under its ``model/`` folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import zipfile
from pathlib import Path

__all__ = ["CONTENTS", "bundle_name", "bundle_files", "pack"]

logger = logging.getLogger(__name__)

# what ships, relative to the bundle root: the folders a bundle is run from, and its licence
CONTENTS: tuple[str, ...] = ("configs", "scripts", "bundle", "models", "docs", "LICENSE")
# never shipped, even when tracked or present (caches and files that a run writes)
_EXCLUDED_PARTS = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints", ".DS_Store"}
_EXCLUDED_SUFFIXES = (".pyc", ".pyo")
# the zip's timestamps: fixed, so that packing the same files twice gives the same bytes
_ZIP_DATE = (2026, 1, 1, 0, 0, 0)


def bundle_name(metadata: dict) -> str:
    """The bundle's file-system name from ``metadata.json``'s human-readable ``name``.

    MONAI model-zoo bundles name their folder and zip after that field in lower case with underscores
    ("Spleen CT segmentation" → ``spleen_ct_segmentation``); the same rule turns ours,
    "Language-guided lesion segmentation", into ``language_guided_lesion_segmentation``.

    Raises:
        ValueError: when ``name`` is missing or has no letter or digit.
    """
    slug = re.sub(r"[^a-z0-9]+", "_", str(metadata.get("name", "")).lower()).strip("_")
    if not slug:
        raise ValueError(f"metadata.json has no usable 'name' to name the bundle after: {metadata.get('name')!r}")
    return slug


def _shipped(rel: str) -> bool:
    parts = Path(rel).parts
    if not parts or parts[0] not in CONTENTS or (len(parts) == 1 and parts[0] != "LICENSE"):
        return False
    return not (_EXCLUDED_PARTS & set(parts)) and not rel.endswith(_EXCLUDED_SUFFIXES)


def _git_files(root: Path) -> list[str] | None:
    """Files git tracks under ``root`` (relative, ``/``-separated), or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "--", *CONTENTS], capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return [p for p in out.decode().split("\0") if p]


def _walked_files(root: Path) -> list[str]:
    """Without git (e.g. a copy of the bundle): the files under :data:`CONTENTS`, less caches; of ``models/``
    only the shipped weights and the notes, as ``.gitignore`` keeps it (checkpoints and exports stay local)."""
    files = []
    for top in CONTENTS:
        path = root / top
        if path.is_file():
            files.append(top)
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_PARTS)
            for f in filenames:
                rel = (Path(dirpath) / f).relative_to(root).as_posix()
                if top == "models" and not (f == "model.pt" or f.endswith(".md")):
                    continue
                files.append(rel)
    return files


def bundle_files(root: str | os.PathLike = ".") -> list[str]:
    """Relative paths of the files that ship, sorted.

    In a git checkout only tracked files ship (their working-tree content), so that stray local files (data,
    checkpoints, exports, notes) never do; elsewhere the folders are walked, leaving caches out.
    """
    root = Path(root)
    listed = _git_files(root)
    if listed is None:
        listed = _walked_files(root)
    # a tracked file deleted from the working tree is not shipped
    files = sorted(rel for rel in set(listed) if _shipped(rel) and (root / rel).is_file())
    _refuse_links(root, files)
    return files


def _refuse_links(root: Path, files: list[str]) -> None:
    """A symlink (tracked or walked) or a path that leaves the bundle would ship a file of the packing machine
    (``/etc/hostname``, a user's home): refused by name."""
    top = root.resolve()
    for rel in files:
        path = root / rel
        parts = [root.joinpath(*Path(rel).parts[: i + 1]) for i in range(len(Path(rel).parts))]
        link = next((p for p in parts if p.is_symlink()), None)
        if link is not None:
            raise ValueError(f"{link} is a symbolic link (to {os.readlink(link)}); a bundle ships regular files only")
        if not path.resolve().is_relative_to(top):
            raise ValueError(f"{rel} resolves outside the bundle ({path.resolve()})")


def _write(zf: zipfile.ZipFile, src: Path, arcname: str) -> None:
    info = zipfile.ZipInfo(arcname, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    with open(src, "rb") as f, zf.open(info, "w") as dst:
        while chunk := f.read(1 << 20):
            dst.write(chunk)


def _check_weights(root: Path) -> None:
    """``models/model.pt`` must load with ``weights_only=True`` and fit the inference config's network strictly
    (a user downloading the zip gets a working bundle); a file that differs from the committed one is shipped
    with a warning."""
    from bundle.load import bundle_parser, load_checkpoint

    weights = root / "models" / "model.pt"
    network = bundle_parser(root / "configs" / "inference.yaml", root=root).get_parsed_content("network_def")
    load_checkpoint(network, weights)
    committed = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "--", "models/model.pt"],
                               capture_output=True)
    if committed.returncode == 1:
        logger.warning("%s differs from the committed models/model.pt; the working-tree file is packed", weights)


def pack(
    root: str | os.PathLike = ".", out: str | os.PathLike = "dist", max_model_mb: float | None = 25.0
) -> Path:
    """Write ``<out>/<name>_v<version>.zip`` of the bundle at ``root`` and return its path.

    Args:
        root: the bundle root (with ``configs/metadata.json``).
        out: destination folder, created if needed.
        max_model_mb: refuse weights ``models/model.pt`` larger than this many MB (None: no limit). A larger file
            is usually a float32 or optimizer-carrying checkpoint shipped by mistake.

    Raises:
        FileNotFoundError: without ``configs/metadata.json`` or ``models/model.pt`` (the inference config loads it).
        ValueError: when ``models/model.pt`` is over ``max_model_mb`` or is not a weights-only checkpoint, or a
            shipped path is a symbolic link or leaves the bundle (each naming the file).
        RuntimeError: when the weights do not fit the inference config's network (naming the file).
    """
    root = Path(root)
    metadata = json.loads((root / "configs" / "metadata.json").read_text())
    name, version = bundle_name(metadata), str(metadata["version"])
    files = bundle_files(root)
    if "models/model.pt" not in files:
        raise FileNotFoundError(f"{root / 'models' / 'model.pt'} is not there (or not tracked): inference needs it")
    model_mb = (root / "models" / "model.pt").stat().st_size / 1e6
    if max_model_mb is not None and model_mb > max_model_mb:
        raise ValueError(f"models/model.pt is {model_mb:.1f} MB, over the {max_model_mb} MB limit")
    _check_weights(root)
    dest = Path(out) / f"{name}_v{version}.zip"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".zip.part")  # a failed pack never leaves a truncated zip under the final name
    with zipfile.ZipFile(tmp, "w") as zf:
        for rel in files:
            _write(zf, root / rel, f"{name}/{rel}")
    tmp.replace(dest)
    logger.info(f"{dest}: {len(files)} files, models/model.pt {model_mb:.1f} MB, {dest.stat().st_size / 1e6:.1f} MB")
    return dest

