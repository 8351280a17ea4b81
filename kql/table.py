"""A small result table for SHOW / DESCRIBE: rows for programs, aligned text for people."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Table:
    """Rows of strings under named columns.

    >>> print(Table(["name", "size"], [["coffee", "400x600"]]))
    name    size
    ------  -------
    coffee  400x600
    """
    columns: list[str]
    rows: list[list[str]]
    title: str = ""
    footer: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        cells = [self.columns] + [[str(c) for c in r] for r in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        lines = ([self.title] if self.title else []) + [fmt(cells[0]), "  ".join("-" * w for w in widths)]
        lines += [fmt(r) for r in cells[1:]]
        return "\n".join(lines + self.footer)

    def as_dicts(self) -> list[dict]:
        return [dict(zip(self.columns, r)) for r in self.rows]
