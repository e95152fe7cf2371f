"""Write one section of a markdown results page, replacing that section if it is there."""

from __future__ import annotations

from pathlib import Path


def update_section(path: Path, heading: str, section: str, page_title: str) -> None:
    """`section` starts with `heading` (a `## ` line); other sections are kept as they are."""
    header = f"# {page_title}\n\nEach section is written by its script in `bench/`.\n"
    text = path.read_text() if path.exists() else header
    start = text.find(heading)
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + (section.rstrip("\n") + "\n\n" + text[end + 1 :] if end >= 0 else section)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
