"""KQL's exceptions: one base class, one subclass per pipeline stage.

Messages name the place and the fix, and show both values when a value is
wrong ("patch 300x300 does not fit image 224x224"). Tests assert on the exact
text, so change a message only together with its test.
"""
from __future__ import annotations


class KqlError(Exception):
    """Base of every error KQL raises on purpose."""


def first_line(error: BaseException) -> str:
    """The first non-blank line of an error's message (its type's name if it
    has none): what a one-line report shows.

    >>> first_line(RuntimeError("out of memory\\nmore detail")), first_line(ValueError())
    ('out of memory', 'ValueError')
    """
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


class ParseError(KqlError):
    """The query text does not follow the grammar.

    ``str()`` gives the position and the message, then the offending line
    with a ``^`` under the column:

    >>> print(ParseError("unexpected 'FORM'", 1, 16, "SELECT HEATMAP FORM coffee"))
    line 1, column 16: unexpected 'FORM'
    SELECT HEATMAP FORM coffee
                   ^

    Attributes:
        line, column: 1-based position of the offending token.
        source_line: the text of that line.
        expected: names of the tokens that would have been accepted.
    """

    def __init__(self, message: str, line: int = 0, column: int = 0,
                 source_line: str = "", expected: tuple[str, ...] = ()):
        self.message = message
        self.line = line
        self.column = column
        self.source_line = source_line
        self.expected = tuple(expected)
        super().__init__(self.__str__())

    @property
    def caret(self) -> str:
        """The offending line with a ``^`` under the column."""
        if not self.source_line:
            return ""
        pad = "".join("\t" if ch == "\t" else " " for ch in self.source_line[: max(self.column - 1, 0)])
        return f"{self.source_line}\n{pad}^"

    def __str__(self) -> str:
        text = f"line {self.line}, column {self.column}: {self.message}" if self.line else self.message
        return f"{text}\n{self.caret}" if self.caret else text


class PlanError(KqlError):
    """The query is well formed but cannot be planned (unknown model or label,
    impossible patch/stride/region, untraceable model, bad weights...)."""


class SettingError(PlanError, ValueError):
    """A ``SET`` option or a ``kql.connect()`` argument is unknown or has a
    bad value. A ``ValueError`` too, as Python code expects of a bad argument."""


class ExecutionError(KqlError):
    """Running a plan failed (the model raised, out of memory, ...)."""


class QueryInterrupted(ExecutionError, KeyboardInterrupt):
    """The user pressed Ctrl-C while a query ran. Nothing was written.

    It is a ``KeyboardInterrupt`` too, so code that stops on Ctrl-C still does.
    """
