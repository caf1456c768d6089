"""MkDocs hook: the site's home page is the repository's README (its ``docs/`` links made relative to ``docs/``),
so the front page is written once."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File


def on_files(files, config):
    readme = Path(config["docs_dir"]).parent / "README.md"
    text = re.sub(r"\]\(docs/", "](", readme.read_text())
    files.append(File.generated(config, "index.md", content=text))
    return files


def on_page_markdown(markdown, page, config, files):
    """A page's link to the README (``../README.md``, which GitHub follows) goes to the site's home page."""
    return re.sub(r"\]\(\.\./README\.md", "](index.md", markdown)
