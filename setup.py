"""Build step that puts the bundle, the job scripts and the deployment files into the package.

Everything else is in pyproject.toml. The wheel (and an install from the sdist, which
carries the same folders through MANIFEST.in) holds them under ``fedcontrast/_resources/``,
where :mod:`fedcontrast.resources` finds them; an editable install uses the checkout's.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: Kept in step with fedcontrast.resources.RESOURCES (setup.py cannot import the package).
RESOURCES = ("bundles/cardiac_seg", "jobs", "deploy")
SKIP = shutil.ignore_patterns("__pycache__", "*.py[co]", "logs", "eval", ".gitignore")


class BuildWithResources(build_py):
    """``build_py`` that also copies :data:`RESOURCES` into ``fedcontrast/_resources``."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's folders
        target = Path(self.build_lib) / "fedcontrast" / "_resources"
        for rel in RESOURCES:
            source = ROOT / rel
            if not source.is_dir():
                raise FileNotFoundError(f"cannot package {source}: missing from the source tree")
            shutil.copytree(source, target / rel, ignore=SKIP, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithResources})
