"""MkDocs hook: two pages of the site are files of the repository itself, so the site holds no copy.

The home page is README.md, its links into ``docs/`` made relative to the site, and the measured
figures page is BENCHMARKS.md.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]


def home_page(readme: str) -> str:
    """README.md as the site's home: ``docs/X.md`` becomes ``X.md``, ``BENCHMARKS.md`` the figures page."""
    readme = re.sub(r"\]\(docs/", "](", readme)
    return readme.replace("](BENCHMARKS.md)", "](figures.md)")


def on_files(files, config):
    files.append(File.generated(config, "index.md", content=home_page((ROOT / "README.md").read_text())))
    files.append(File.generated(config, "figures.md", content=(ROOT / "BENCHMARKS.md").read_text()))
    return files
