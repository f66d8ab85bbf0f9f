"""Print the pip section of environment.yml as pip arguments (stdlib only, no YAML package).

Used by the Makefile to build a virtual environment from the same file a conda user would use,
so the dependency list exists once. Only the `- pip:` block's items are printed, one per line.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path


def pip_items(text: str) -> list[str]:
    """Items of the `- pip:` list in a conda environment file, comments removed."""
    items: list[str] = []
    in_pip, pip_indent = False, -1
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if re.match(r"^\s*-\s*pip:\s*$", line):
            in_pip, pip_indent = True, indent
            continue
        if in_pip:
            if indent <= pip_indent:
                break
            match = re.match(r"^\s*-\s+(.+)$", line)
            if match:
                items.append(match.group(1).strip().strip("'\""))
    return items


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "environment.yml")
    found = pip_items(path.read_text())
    if not found:
        sys.exit(f"{path}: no '- pip:' section found")
    for item in found:
        # "-e .[x]" becomes two arguments for pip
        print(*item.split(" ", 1), sep="\n")
