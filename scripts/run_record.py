"""Which training run a checkpoint belongs to: the data it was trained on and its MLflow run."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["RunRecord", "command_line", "datalist_digest", "read_run_record", "run_tags"]

logger = logging.getLogger(__name__)

# the entry of a training checkpoint (train#checkpoint_state) that holds the record
RECORD_KEY = "run"
_PATH_KEYS = ("image", "label")


def command_line(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> str:
    """The command that started this process, as it can be typed again: ``python -m <module>`` where Python ran a
    package's ``__main__.py`` (``sys.argv[0]`` is then that file's path, e.g. ``.../monai/bundle/__main__.py``),
    ``torchrun --nnodes N --nproc_per_node M`` in front where torchrun started it (its environment says so), and
    every argument quoted where a shell needs it (``' '.join`` would leave ``--text_keys "{'a': 'b'}"`` unusable).
    """
    args, env = list(sys.argv if argv is None else argv), os.environ if env is None else env
    launcher = ["python"]
    if "TORCHELASTIC_RUN_ID" in env and env.get("LOCAL_WORLD_SIZE"):
        local, world = int(env["LOCAL_WORLD_SIZE"]), int(env.get("WORLD_SIZE", env["LOCAL_WORLD_SIZE"]))
        launcher = ["torchrun", f"--nnodes={max(world // local, 1)}", f"--nproc_per_node={local}"]
    main = Path(args[0]) if args else None
    if main is not None and main.name == "__main__.py":
        package = [main.parent.name]
        for parent in main.parent.parents:  # up while the folders are packages: monai/bundle -> monai.bundle
            if not (parent / "__init__.py").is_file():
                break
            package.insert(0, parent.name)
        args[0:1] = [*launcher, "-m", ".".join(package)]
    elif launcher[0] == "torchrun" and args:
        args[0:0] = launcher
    return shlex.join(args)


def datalist_digest(*splits: Sequence[Mapping[str, Any]]) -> str:
    """SHA-256 (hex) of datalist entries, e.g. the training and the validation list.

    Image and label paths enter by file name only, so moving or remounting a dataset folder keeps the digest,
    while another sample, another report or another split changes it. Entry order does not matter.
    """

    def canonical(item: Mapping[str, Any]) -> str:
        fields = {
            k: (Path(str(v)).name if k in _PATH_KEYS and isinstance(v, (str, os.PathLike)) else v)
            for k, v in item.items()
        }
        return json.dumps(fields, sort_keys=True, default=str)

    h = hashlib.sha256()
    for split in splits:
        for line in sorted(canonical(item) for item in split):
            h.update(line.encode("utf-8"))
            h.update(b"\n")
        h.update(b"\x00")  # the boundary between splits: moving a sample from one to the other changes the digest
    return h.hexdigest()


def read_run_record(checkpoint: str | os.PathLike) -> dict[str, str] | None:
    """The run record saved in a training checkpoint, or None when it has none (written before 0.7.0, or by
    another tool). Memory-mapped: the weights are not read."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    record = saved.get(RECORD_KEY) if isinstance(saved, Mapping) else None
    return dict(record) if isinstance(record, Mapping) else None


class RunRecord:
    """The identity of a training run, saved in each of its training checkpoints and checked before
    ``--resume True`` takes one.

    A checkpoint left in ``ckpt_dir`` by another run must not be resumed silently. The record holds the
    :func:`datalist_digest` of the training and validation lists; a checkpoint whose digest differs, or that
    records no run at all, is *foreign*: resuming from it is an error naming the file, unless ``force`` (then a
    warning). The record also holds the run's MLflow run id: a resumed training continues that MLflow run
    (``scripts.engine.ResumableMLFlowHandler`` reads :attr:`resumed_run_id`), whatever ``run_name`` says.

    It is a checkpointable object (``state_dict``/``load_state_dict``), listed in ``train#checkpoint_state``.

    Args:
        data: the training entries.
        validation: the validation entries.
        checkpoint: the checkpoint that ``--resume True`` will load; None for a new run.
        force: resume from a foreign checkpoint anyway (``--resume_foreign True``).

    Raises:
        ValueError: a foreign checkpoint without ``force``, naming it and what differs.
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        validation: Sequence[Mapping[str, Any]] = (),
        checkpoint: str | os.PathLike | None = None,
        force: bool = False,
    ) -> None:
        self.datalist_sha256 = datalist_digest(data, validation)
        self.mlflow_run_id: str | None = None  # set by the tracking handler once its run is known
        self.resumed: dict[str, str] | None = None  # the record of the checkpoint resumed from
        if checkpoint is not None:
            self._check(Path(checkpoint), force)

    @property
    def resumed_run_id(self) -> str | None:
        """The MLflow run id of the checkpoint resumed from, if it recorded one."""
        return (self.resumed or {}).get("mlflow_run_id") or None

    def _check(self, checkpoint: Path, force: bool) -> None:
        self.resumed = read_run_record(checkpoint)
        if self.resumed is None:
            problem = "records no run (written by a bundle before 0.7.0, or by another tool)"
        elif self.resumed.get("datalist_sha256") != self.datalist_sha256:
            problem = (
                f"was trained on other data (datalist digest {str(self.resumed.get('datalist_sha256'))[:12]}, "
                f"this run's {self.datalist_sha256[:12]})"
            )
        else:
            return
        if not force:
            raise ValueError(
                f"resume: checkpoint {checkpoint} {problem}, so it belongs to another run: train a new run in "
                "another --ckpt_dir, or pass --resume_foreign True to continue from it anyway"
            )
        logger.warning("resume: checkpoint %s %s; resumed anyway (--resume_foreign True)", checkpoint, problem)

    def state_dict(self) -> dict[str, str]:
        return {"datalist_sha256": self.datalist_sha256, "mlflow_run_id": self.mlflow_run_id or ""}

    def load_state_dict(self, state: Mapping[str, str]) -> None:
        """Nothing to restore: the checkpoint's record was read and checked when this object was made, before
        the tracking handler chose its MLflow run."""


def run_tags(record: RunRecord, datalist: str | os.PathLike | None = None) -> dict[str, str]:
    """MLflow tags that say where a run came from: the bundle's git commit (MLflow's own
    ``mlflow.source.git.commit``, with ``-dirty`` when the working tree has uncommitted changes; absent outside a
    git checkout, e.g. an unpacked zip), the bundle name and version as ``mlflow.source.name``, and the data:
    the datalist file and the :func:`datalist_digest` of what was trained and validated on."""
    from scripts import BUNDLE_DIR

    tags = {"dataset.sha256": record.datalist_sha256}
    if datalist is not None:
        tags["dataset"] = str(datalist)
    try:
        meta = json.loads((BUNDLE_DIR / "configs" / "metadata.json").read_text())
        tags["mlflow.source.name"] = f"{meta.get('name', BUNDLE_DIR.name)} {meta.get('version', '')}".strip()
    except (OSError, ValueError):
        tags["mlflow.source.name"] = BUNDLE_DIR.name
    if (BUNDLE_DIR / ".git").exists():
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(BUNDLE_DIR), *args], capture_output=True, text=True,
                                  timeout=30).stdout.strip()

        try:
            commit = git("rev-parse", "HEAD")
            if commit:
                dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
                tags["mlflow.source.git.commit"] = commit + ("-dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            pass  # no git on this machine: the bundle version still names the source
    return tags
