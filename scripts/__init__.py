"""Python package that the bundle's configs instantiate: networks, transforms, losses and engine glue."""

from pathlib import Path

BUNDLE_DIR = Path(__file__).resolve().parent.parent
"""The bundle folder this package belongs to."""


def configs_dir() -> str:
    """The ``configs/`` folder of this bundle, as a string: the configs that ran, logged with each run."""
    return str(BUNDLE_DIR / "configs")


from scripts.console import quiet_third_party  # noqa: E402
from scripts.errors import install_cause_hook  # noqa: E402

install_cause_hook()  # a failed `monai.bundle run` ends with the error that caused it
quiet_third_party()
