"""The README is the landing page and each guide is a page under docs/: every relative link in them points to a
file or folder that exists (and, with `#anchor`, to a heading of that page), so moving a file cannot leave a
guide pointing at nothing."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target); images excluded
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)  # code blocks hold no links


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation but `-` and `_` dropped, spaces -> `-`."""
    titles = re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-") for title in titles}


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(FENCE.sub("", page.read_text())) if not re.match(r"^[a-z]+:", t)]


def test_the_readme_links_every_guide():
    linked = {(ROOT / target).resolve() for target in relative_links(ROOT / "README.md")}
    guides = {page.resolve() for page in PAGES[1:]}
    assert len(guides) >= 8 and not guides - linked, f"guides the README does not link: {sorted(guides - linked)}"


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in relative_links(page):
            path, _, anchor = target.partition("#")
            destination = (page.parent / path).resolve() if path else page
            if not destination.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and destination.suffix == ".md" and anchor not in heading_anchors(destination):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
