"""The code snippets of README's "Use with" section, by name, so that tests run them
as they stand (a snippet follows its ``<!-- use-with: NAME -->`` marker)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(name: str) -> str:
    """The ```python block after ``<!-- use-with: name -->`` in README."""
    match = re.search(rf"<!-- use-with: {re.escape(name)} -->\s*```python\n(.*?)```", README.read_text(), re.DOTALL)
    if match is None:
        raise LookupError(f"README has no 'use-with: {name}' snippet")
    return match.group(1)


def run_snippet(name: str) -> dict[str, object]:
    """Run a snippet in a namespace of its own, and return the namespace."""
    namespace: dict[str, object] = {"__name__": f"readme_{name}"}
    exec(compile(snippet(name), f"README.md:use-with:{name}", "exec"), namespace)
    return namespace
