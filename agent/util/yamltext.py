"""YAML in and out, safely: libyaml's safe loader where PyYAML was built with it (about ten
times faster than PyYAML's own), and PyYAML imported on first use, not by the agent's start.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class YamlError(ValueError):
    """Text that is not YAML; the message says where (line and column, from 1) if known."""

    def __init__(self, problem: str, line: int | None = None,
                 column: int | None = None) -> None:
        where = f" (line {line}, column {column})" if line is not None else ""
        super().__init__(f"{problem}{where}")
        self.problem = problem
        self.line = line
        self.column = column


def safe_load(text: str) -> Any:
    """The data in ``text`` (plain YAML types only); raises :class:`YamlError`."""
    import yaml

    loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or "not valid YAML"
        if mark is None:
            raise YamlError(problem) from None
        raise YamlError(problem, mark.line + 1, mark.column + 1) from None


def safe_dump(data: Mapping[str, Any]) -> str:
    """``data`` as block-style YAML with sorted keys."""
    import yaml

    text: str = yaml.safe_dump(dict(data), default_flow_style=False, sort_keys=True)
    return text
