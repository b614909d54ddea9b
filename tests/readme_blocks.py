"""The `sh` blocks of README.md, in order, with the marker that may precede each.

A marker is an HTML comment on the line before the fence (invisible on GitHub):

    <!-- readme-test: skip REASON -->      not run here; REASON says what it needs
    <!-- readme-test: install REASON -->   the set-up line: checked, not executed
    <!-- readme-test: restart -->          run, then restart the server (as the text says)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MARKER = re.compile(r"^<!--\s*readme-test:\s*(skip|install|restart)\b\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced `sh` block: where it is and what to do with it."""

    line: int  # 1-based line of the opening fence
    section: str  # the `##` heading above it
    code: str
    action: str = "run"  # run, skip, install or restart
    reason: str = ""

    @property
    def name(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")
        return f"L{self.line}-{slug}"


def sh_blocks(readme: Path) -> list[Block]:
    """Every ```sh block of `readme`, in order; a marker applies to the next fence only."""
    blocks: list[Block] = []
    lines = readme.read_text("utf-8").splitlines()
    section = ""
    marker: tuple[str, str] | None = None
    i = 0
    while i < len(lines):
        text = lines[i]
        if text.startswith("## "):
            section = text[3:].strip()
        found = MARKER.match(text)
        if found:
            marker = (found[1], found[2])
            i += 1
            continue
        fence = FENCE.match(text)
        if fence:
            end = i + 1
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            if fence[1] == "sh":
                action, reason = marker or ("run", "")
                code = "\n".join(lines[i + 1 : end]) + "\n"
                blocks.append(Block(i + 1, section, code, action, reason))
            marker = None
            i = end + 1
            continue
        if text.strip():
            marker = None  # a marker must sit right above its fence
        i += 1
    return blocks
