"""python -m bundle pack: a MONAI bundle zip that `monai.bundle download` accepts and that runs on its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import BUNDLE_ROOT, SHARED_DATA
from PIL import Image

from bundle.__main__ import main
from bundle.pack import bundle_files, bundle_name, pack

NAME = "language_guided_lesion_segmentation"
REAL_IMAGE = SHARED_DATA / "qata" / "images" / "covid_0001.png"


def test_bundle_name_follows_the_model_zoo_convention():
    assert bundle_name({"name": "Language-guided lesion segmentation"}) == NAME
    assert bundle_name({"name": "Spleen CT segmentation"}) == "spleen_ct_segmentation"
    with pytest.raises(ValueError, match="name"):
        bundle_name({"name": " - "})


def _small_bundle(root):
    """A copy of the bundle's configs with stand-in weights, caches and files that must not ship."""
    shutil.copytree(BUNDLE_ROOT / "configs", root / "configs")
    for rel, content in {
        "LICENSE": "licence", "scripts/__init__.py": "", "docs/README.md": "docs", "models/model.pt": "weights",
        "models/README.md": "notes", "tests/test_x.py": "", "bundle/__main__.py": "", "Makefile": "all:",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(content)


def _strays(root):
    for rel in ("models/checkpoint_epoch=3.pt", "scripts/__pycache__/x.cpython-311.pyc", "scripts/local_notes.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("stray")


def test_only_tracked_files_ship_from_a_git_checkout(tmp_path):
    _small_bundle(tmp_path)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "bundle"], check=True)
    _strays(tmp_path)  # untracked: never shipped
    files = bundle_files(tmp_path)
    assert {"LICENSE", "models/model.pt", "models/README.md", "configs/inference.yaml", "docs/README.md",
            "bundle/__main__.py"} <= set(files)
    assert not any(f.startswith(("tests/", "Makefile")) or "stray" in f or "checkpoint" in f or "local_notes" in f
                   or "__pycache__" in f for f in files)


def test_outside_git_the_folders_are_walked_without_caches_or_checkpoints(tmp_path):
    _small_bundle(tmp_path)
    _strays(tmp_path)
    files = bundle_files(tmp_path)
    assert {"LICENSE", "models/model.pt", "configs/inference.yaml", "docs/README.md", "bundle/__main__.py"} <= set(files)
    # an untracked source file cannot be told from a real one without git: it ships; caches and checkpoints do not
    assert not any(f.startswith(("tests/", "Makefile")) or "checkpoint" in f or "__pycache__" in f for f in files)


def test_pack_refuses_missing_or_oversized_weights(tmp_path):
    _small_bundle(tmp_path)
    with pytest.raises(ValueError, match="over the"):
        pack(tmp_path, tmp_path / "dist", max_model_mb=1e-6)
    (tmp_path / "models" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="model.pt"):
        pack(tmp_path, tmp_path / "dist")


@pytest.mark.slow
def test_pack_then_download_then_run_inference_from_the_unpacked_bundle(tmp_path):
    """The zip's members, `monai.bundle.download(url="file://...")` into a fresh folder, and
    `python -m monai.bundle run inference` from another folder, without PYTHONPATH."""
    if not REAL_IMAGE.is_file():
        pytest.skip(f"shared QaTa data not found at {REAL_IMAGE}")
    assert main(["pack", "--out", str(tmp_path / "dist")]) == 0
    version = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())["version"]
    zip_path = tmp_path / "dist" / f"{NAME}_v{version}.zip"
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
        assert json.loads(zf.read(f"{NAME}/configs/metadata.json"))["version"] == version
    assert {f"{NAME}/{f}" for f in ("configs/inference.yaml", "models/model.pt", "LICENSE", "scripts/__init__.py",
                                   "docs/README.md", "bundle/__main__.py")} <= names
    assert all(n.startswith(f"{NAME}/") for n in names)  # one top-level folder, the bundle's name
    assert not any(n.split("/")[1] in ("tests", "runs", "eval", ".venv", "Makefile", ".ci") for n in names)
    assert (BUNDLE_ROOT / "models" / "model.pt").stat().st_size <= 25e6

    # monai.bundle.download with a file:// url works offline (urllib opens it) and extracts <bundle_dir>/<name>/;
    # `name` is needed: without it download() fails after extracting (its version check joins bundle_dir and None)
    from monai.bundle import download

    bundles = tmp_path / "bundles"
    download(name=NAME, url=zip_path.as_uri(), bundle_dir=str(bundles), progress=False)
    unpacked = bundles / NAME
    assert (unpacked / "configs" / "inference.yaml").is_file()

    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    shutil.copy(REAL_IMAGE, images / REAL_IMAGE.name)
    # no PYTHONPATH at all, run from another folder: MONAI puts the bundle root on sys.path itself, as for zoo bundles
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "inference",
         "--meta_file", str(unpacked / "configs" / "metadata.json"),
         "--config_file", str(unpacked / "configs" / "inference.yaml"), "--bundle_root", str(unpacked),
         "--dataset_dir", str(images), "--output_dir", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    mask = np.array(Image.open(out / f"{REAL_IMAGE.stem}_seg.png"))
    assert mask.shape == np.array(Image.open(REAL_IMAGE)).shape
    assert set(np.unique(mask)) == {0, 255}  # binary (PNG 0/255), with a lesion on this COVID-19 image
    # the shipped weights, not a random network: the mask overlaps the ground truth (image only, no report here)
    truth = np.array(Image.open(SHARED_DATA / "qata" / "masks" / REAL_IMAGE.name)) > 127
    pred = mask > 0
    assert 2 * (pred & truth).sum() / (pred.sum() + truth.sum()) > 0.5

    # the command line the docs use runs from inside the unpacked folder, without the repository
    layout = tmp_path / "layout"
    for sub in ("images", "masks", "reports"):  # one QaTa sample in the `folder` layout
        src = next((SHARED_DATA / "qata" / sub).glob(REAL_IMAGE.stem + ".*"))
        (layout / sub).mkdir(parents=True)
        shutil.copy(src, layout / sub / src.name)
    for args in (["demo-data", "--out", "demo", "--num-samples", "4"],
                 ["datalist", "folder", "--root", str(layout), "--out", str(tmp_path / "list.json")]):
        proc = subprocess.run([sys.executable, "-m", "bundle", *args], cwd=unpacked, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (unpacked / "demo" / "datalist.json").is_file() and (tmp_path / "list.json").is_file()


def test_pack_refuses_symlinks_and_weights_that_do_not_fit(tmp_path):
    """A tracked symlink to /etc/hostname once shipped the packing machine's file inside the zip (issue 20)."""
    _small_bundle(tmp_path)
    os.symlink("/etc/hostname", tmp_path / "docs" / "host.md")
    with pytest.raises(ValueError, match=r"docs/host\.md is a symbolic link \(to /etc/hostname\)"):
        bundle_files(tmp_path)
    (tmp_path / "docs" / "host.md").unlink()
    # the stand-in "weights" text is not a checkpoint: refused before anything is written, naming the file
    with pytest.raises(ValueError, match=r"checkpoint .*models/model\.pt"):
        pack(tmp_path, tmp_path / "dist")
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").glob("*.zip"))
    import torch

    torch.save({"not": torch.ones(1)}, tmp_path / "models" / "model.pt")
    with pytest.raises(RuntimeError, match=r"checkpoint .*model\.pt: does not fit TMCA"):
        pack(tmp_path, tmp_path / "dist")


def test_the_shipped_docs_name_only_tools_the_zip_contains():
    """Every `python -m bundle <verb>` in a shipped file is a verb of the shipped command line, every `bundle/<file>`
    it names ships, and a `make` target (the Makefile does not ship) is only named as the repository's."""
    import re

    from bundle.__main__ import build_parser

    verbs = set(next(a for a in build_parser()._actions if a.dest == "verb").choices)
    targets = set(re.findall(r"^([a-z][a-z-]*):", (BUNDLE_ROOT / "Makefile").read_text(), flags=re.M))
    shipped = bundle_files(BUNDLE_ROOT)
    problems, checked = [], 0
    for rel in shipped:
        if not rel.endswith((".md", ".yaml", ".json", ".sh", ".py")):
            continue
        for n, line in enumerate((BUNDLE_ROOT / rel).read_text(encoding="utf-8").splitlines(), 1):
            for verb in re.findall(r"python -m bundle ([a-z][a-z-]*)", line):
                checked += 1
                if verb not in verbs:
                    problems.append(f"{rel}:{n}: no verb {verb!r}")
            for path in re.findall(r"\bbundle/([a-z_]+\.(?:py|sh))\b", line):
                checked += 1
                if f"bundle/{path}" not in shipped:
                    problems.append(f"{rel}:{n}: bundle/{path} does not ship")
            for target in re.findall(r"`make ([a-z][a-z-]*)`", line):
                checked += 1
                if target in targets and "repository" not in line:
                    problems.append(f"{rel}:{n}: `make {target}` without saying it is the repository's")
    assert checked > 20, checked  # the docs do use the command line: the patterns still match something
    assert not problems, "\n".join(problems)
