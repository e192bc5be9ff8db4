"""Print the configuration reference (every key, default, meaning) as a Markdown table.

README.md embeds this output between the ``config-reference`` markers;
``python tools/config_reference.py --write`` refreshes it, and a test checks it is current.
"""

from __future__ import annotations

import sys
from pathlib import Path

from msilo.config import describe

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"


def _default(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def render() -> str:
    """The Markdown table of every configuration key."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for section, key, default, doc in describe():
        cell = _default(default).replace("|", "\\|")
        lines.append(f"| `{section}.{key}` | `{cell}` | {doc.replace('|', '/')} |")
    return "\n".join(lines)


def refresh(readme: Path) -> str:
    """README text with the table between the markers replaced by the current one."""
    text = readme.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{render()}\n{END}{tail}"


if __name__ == "__main__":
    readme = Path(__file__).resolve().parent.parent / "README.md"
    if "--write" in sys.argv:
        readme.write_text(refresh(readme))
    else:
        print(render())
