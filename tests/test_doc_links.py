"""Every relative link and image in the project's Markdown points at a file that exists.

Run reports are copied into ``benchmarks/results/`` from bench folders; a report copied
without its figures, or a README that names a moved result, shows up here rather than as
a broken image for the reader.
"""

import re
from pathlib import Path

from conftest import REPO

#: Top-level folders whose Markdown is part of the project (``workspace/`` and virtual
#: environments are not).
DOCUMENTED = ("benchmarks", "bundles", "deploy", "docs", "jobs")
#: ``[text](target)`` or ``![alt](target)``; the target stops at whitespace, ``)`` or ``#``.
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)\s]*)?(?:\s+\"[^\"]*\")?\)")


def markdown_files() -> list[Path]:
    """The project's Markdown files: the top-level README and those under :data:`DOCUMENTED`."""
    documented = sorted(path for folder in DOCUMENTED for path in (REPO / folder).rglob("*.md"))
    return [REPO / "README.md", *documented]


def broken_links(markdown: Path) -> list[str]:
    """The relative link targets in ``markdown`` that name no existing file or folder."""
    targets = LINK.findall(markdown.read_text(encoding="utf-8"))
    return [
        target
        for target in targets
        if "://" not in target
        and not target.startswith("mailto:")
        and not (markdown.parent / target).exists()
    ]


def test_link_pattern_reads_targets_without_anchor_or_title():
    text = '![a](plots/x.png) [b](../r.md#section) [c](y.json "title") [d](https://e.org)'
    assert LINK.findall(text) == ["plots/x.png", "../r.md", "y.json", "https://e.org"]


def test_every_relative_markdown_link_resolves():
    files = markdown_files()
    assert len(files) > 100, "the results' reports were not found"
    broken = {str(path.relative_to(REPO)): links for path in files if (links := broken_links(path))}
    assert not broken, f"links to missing files: {broken}"
