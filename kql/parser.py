"""Parse KQL text into the statements of :mod:`kql.ast`.

The syntax lives in ``grammar/kql.lark``; this module loads it once, turns
lark's tree into frozen dataclasses, and turns lark's exceptions into
:class:`kql.errors.ParseError` with a position, the offending line and the
friendly names of what would have been accepted.

>>> parse("SELECT HEATMAP FROM cat USING vgg16 PATCH 16x8 STRIDE 4").patch
(16, 8)
>>> parse("SELECT HEATMAP FROM scan USING net PATCH 8 STRIDE 4x4x2").stride_for(3)
(4, 4, 2)
>>> [type(s).__name__ for s in parse_script("SHOW MODELS; HELP")]
['ShowModels', 'Help']
"""
from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from typing import Any

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from kql import ast
from kql.errors import ParseError
from kql.grammar import GRAMMAR_PATH

__all__ = ["parse", "parse_script"]

# How many keywords an "expected ..." list shows before "...".
_MAX_EXPECTED_KEYWORDS = 8

# Friendly names of the terminals that are not keywords, in the order they
# are listed after the keywords.
_TERMINAL_NAMES = {
    "INT": "an integer",
    "FLOAT": "a number",
    "SIZE": "a size like 16x8",
    "MEMORY": "a memory size like 2GB",
    "STRING": "a quoted string",
    "NAME": "an identifier",
    "_LPAR": "'('",
    "_RPAR": "')'",
    "_COMMA": "','",
    "_EQUAL": "'='",
    "_SEMI": "';'",
    "$END": "end of input",
}

# Examples shown when a required clause is missing.
_CLAUSE_EXAMPLES = {"PATCH": "PATCH 16", "STRIDE": "STRIDE 4"}


def parse(text: str) -> ast.Statement:
    """Parse exactly one statement; a trailing ``;`` is optional.

    Raises:
        ParseError: the text is not one well-formed statement.

    >>> parse("set batch_size = 32;")
    Set(option='batch_size', value=32)
    """
    statements = _parse(text)
    if not statements:
        raise ParseError("empty query; expected a statement (e.g. HELP)",
                         1, 1, _line(text, 1), ("a statement",))
    if len(statements) > 1:
        meta = statements[1][0]
        raise ParseError("expected one statement, found a second one; "
                         "run them one at a time or as a script",
                         meta.line, meta.column, _line(text, meta.line), ("end of input",))
    return statements[0][1]


def parse_script(text: str) -> list[ast.Statement]:
    """Parse statements separated by ``;`` (the last ``;`` is optional).

    Returns an empty list for text that holds only comments and whitespace.
    Line and column numbers in errors are the script's.

    Raises:
        ParseError: at the first place where the script stops being KQL.

    >>> parse_script("-- nothing to do\\n")
    []
    """
    return [statement for _, statement in _parse(text)]


@functools.cache
def _lark() -> Lark:
    # Built once per process: the LALR tables take a few tens of milliseconds.
    return Lark.open(str(GRAMMAR_PATH), parser="lalr", lexer="contextual",
                     start="script", propagate_positions=True, maybe_placeholders=True)


def _parse(text: str) -> list[tuple[Any, ast.Statement]]:
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as e:
        raise _from_lark(e, text) from None
    try:
        return _ToAst(text).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, ParseError):
            raise e.orig_exc from None
        raise


# ---------------------------------------------------------------- errors

def _line(text: str, number: int) -> str:
    # lark counts lines by "\n" only; str.splitlines() would also split on
    # "\x0c", "\u2028", ... and pick the wrong line.
    lines = text.split("\n")
    return lines[number - 1].rstrip("\r") if 0 < number <= len(lines) else ""


def _friendly(names) -> list[str]:
    """Display names: keywords sorted, then the other terminals in a fixed order."""
    names = set(names)
    if "FLOAT" in names:
        names.discard("INT")            # "a number" covers "an integer"
    keywords = sorted(n.lstrip("_") for n in names if n not in _TERMINAL_NAMES)
    others = [friendly for name, friendly in _TERMINAL_NAMES.items() if name in names]
    return keywords + others


def _expected_phrase(names: list[str]) -> str:
    keywords = [n for n in names if n.isupper()]
    others = [n for n in names if not n.isupper()]
    if len(keywords) > _MAX_EXPECTED_KEYWORDS:
        keywords = keywords[:_MAX_EXPECTED_KEYWORDS] + ["..."]
    items = keywords + others
    if len(items) == 1:
        return f"expected {items[0]}"
    if len(items) == 2:
        return f"expected {items[0]} or {items[1]}"
    return f"expected one of {', '.join(items[:-1])} or {items[-1]}"


def _accepts_after(prefix: str) -> set[str]:
    """The terminals the parser accepts after ``prefix`` (which parses so far).

    The lexer's own list for a bad character is the LALR lookahead set, which
    merges contexts (it would offer INPUT inside a SELECT) and lacks the end
    of input; replaying the prefix gives the exact set.
    """
    try:
        interactive = _lark().parse_interactive(prefix)
        interactive.exhaust_lexer()
        return set(interactive.accepts())
    except Exception:  # only a nicer list is lost
        return set()


def _from_lark(e: UnexpectedInput, text: str) -> ParseError:
    if isinstance(e, UnexpectedToken):
        token = e.token
        end = len(text) if token.type == "$END" else token.start_pos
        names = _accepts_after(text[:end]) or e.expected
        if token.type == "$END":
            # lark puts the end token on the last real token; point just past it.
            line = token.end_line or 1
            column = token.end_column or 1
            what = "end of input"
        else:
            line, column = token.line, token.column
            what = f"string {token}" if token.type == "STRING" else f"'{token}'"
    elif isinstance(e, UnexpectedCharacters):
        line, column = e.line, e.column
        names = _accepts_after(text[:e.pos_in_stream]) or e.allowed or ()
        char = text[e.pos_in_stream]
        if char in "'\"":
            return ParseError(f"unterminated string; end it with {char}",
                              line, column, _line(text, line), (char,))
        word = re.match(r"[\w.]+", text[e.pos_in_stream:])
        what = f"'{word.group() if word else char}'"
    else:  # pragma: no cover - LALR raises only the two above
        return ParseError(str(e), getattr(e, "line", 0), getattr(e, "column", 0))
    names = set(names)
    if "_SELECT" in names:
        # At the start of a statement ';' and the end are allowed too (empty
        # statements), but listing them there only hides the keywords.
        names -= {"_SEMI", "$END"}
    expected = _friendly(names)
    message = f"unexpected {what}"
    keywords = [n for n in expected if n.isupper()]
    guess = difflib.get_close_matches(what.strip("'").upper(), keywords, n=1, cutoff=0.75)
    if guess and len(expected) > 1:
        message += f" (did you mean {guess[0]}?)"
    if expected:
        message += f"; {_expected_phrase(expected)}"
    return ParseError(message, line, column, _line(text, line), tuple(expected))


# ---------------------------------------------------------------- tree -> AST

@dataclass(frozen=True)
class _Clause:
    """One optional clause, kept with its position for error messages."""
    key: str        # what may appear once: "color", "mode", ...
    keyword: str    # as the user knows it: "COLOR", "NAIVE", ...
    value: Any
    meta: Any


_CHILD = object()


def _clause(key: str, keyword: str | None = None, value: Any = _CHILD):
    """A rule callback wrapping the rule's one child (or a fixed value) in a _Clause."""
    keyword = keyword or key.upper()

    @v_args(meta=True)
    def callback(self, meta, children):
        return _Clause(key, keyword, children[0] if value is _CHILD else value, meta)
    return callback


def _constant(value):
    return lambda self, children: value


class _ToAst(Transformer):
    """Turns the parse tree of ``script`` into ``[(meta, Statement), ...]``."""

    def __init__(self, text: str):
        super().__init__()
        self._text = text

    def _error(self, message: str, line: int, column: int, expected=()) -> ParseError:
        return ParseError(message, line, column, _line(self._text, line), tuple(expected))

    def _clauses(self, clauses: list[_Clause]) -> dict[str, _Clause]:
        """Index clauses by key; a clause given twice is an error at the second."""
        seen: dict[str, _Clause] = {}
        for clause in clauses:
            first = seen.get(clause.key)
            if first is not None:
                if first.keyword == clause.keyword:
                    message = f"{clause.keyword} is given twice"
                else:
                    message = f"{clause.keyword} conflicts with {first.keyword}; keep one of them"
                raise self._error(message, clause.meta.line, clause.meta.column)
            seen[clause.key] = clause
        return seen

    def _require(self, clauses: dict, keys: tuple[str, ...], meta) -> None:
        """Report missing required clauses just past the end of the statement."""
        missing = [k.upper() for k in keys if k not in clauses]
        if not missing:
            return
        example = " ".join(_CLAUSE_EXAMPLES[k] for k in missing)
        if len(missing) == 1:
            message = f"missing {missing[0]} clause (e.g. {example})"
        else:
            message = f"missing {' and '.join(missing)} clauses (e.g. {example})"
        raise self._error(message, meta.end_line, meta.end_column, missing)

    # -- terminals

    def STRING(self, token: Token) -> str:
        quote = token[0]
        return token[1:-1].replace(quote * 2, quote)

    def NAME(self, token: Token) -> str:
        return str(token)

    def INT(self, token: Token) -> int:
        return int(token)

    def FLOAT(self, token: Token) -> float:
        return float(token)

    def SIZE(self, token: Token) -> tuple[int, ...]:
        return tuple(int(v) for v in re.split("[xX]", token))

    def MEMORY(self, token: Token) -> str:
        return str(token)

    # -- script

    def script(self, children):
        return [statement for statement in children if statement is not None]

    @v_args(meta=True)
    def statement(self, meta, children):
        return meta, children[0]

    # -- SELECT

    @v_args(meta=True)
    def select(self, meta, children):
        source, model, *clauses = children
        found = self._clauses(clauses)
        self._require(found, ("patch", "stride"), meta)
        values = {key: clause.value for key, clause in found.items()}
        if isinstance(values.get("mode"), ast.Approx):
            values["approx"], values["mode"] = values["mode"], "approx"
        return ast.Select(source=source, model=model, **values)

    def path_source(self, children):
        return ast.Source("path", children[0])

    def name_source(self, children):
        return ast.Source("name", children[0])

    def size(self, children):
        # As written: `16` -> (16,), expanded per model by Select.patch_for.
        value = children[0]
        return value if isinstance(value, tuple) else (value,)

    weights = _clause("weights")
    patch = _clause("patch")
    stride = _clause("stride")
    color = _clause("color")
    label = _clause("label")
    batch = _clause("batch")
    into = _clause("into")
    resample = _clause("resample")
    normalize_minmax = _clause("normalize", "NORMALIZE", "minmax")
    normalize_zscore = _clause("normalize", "NORMALIZE", "zscore")
    normalize_none = _clause("normalize", "NORMALIZE", "none")

    @v_args(meta=True)
    def window(self, meta, children):
        return _Clause("window", "WINDOW", (float(children[0]), float(children[1])), meta)
    input_size = _clause("input_size", "INPUT")
    architecture = _clause("architecture")
    gates_exact = _clause("gates", "GATES", "exact")
    gates_local = _clause("gates", "GATES", "local")
    gates_frozen = _clause("gates", "GATES", "frozen")
    naive = _clause("mode", "NAIVE", "naive")
    exact = _clause("mode", "EXACT", "exact")
    cpu = _clause("device", "ON", "cpu")
    cuda = _clause("device", "ON", "cuda")
    trusted = _clause("trusted", value=True)

    @v_args(meta=True)
    def approx_tau(self, meta, children):
        return _Clause("mode", "APPROX", ast.Approx("tau", float(children[0])), meta)

    @v_args(meta=True)
    def approx_ssim(self, meta, children):
        return _Clause("mode", "APPROX", ast.Approx("ssim", float(children[0])), meta)

    @v_args(meta=True)
    def drilldown(self, meta, children):
        options = self._clauses(children)
        return _Clause("drilldown", "DRILLDOWN",
                       ast.Drilldown(**{key: float(c.value) for key, c in options.items()}), meta)

    fraction = _clause("fraction", "FRACTION")
    speedup = _clause("speedup", "SPEEDUP")

    @v_args(meta=True)
    def taus(self, meta, children):
        return _Clause("taus", "TAUS", tuple(float(c) for c in children), meta)

    @v_args(meta=True)
    def tune(self, meta, children):
        model, images, *clauses = children
        found = self._clauses(clauses)
        self._require(found, ("patch",), meta)
        return ast.Tune(model, images, **{key: clause.value for key, clause in found.items()})

    def tune_path(self, children):
        return ast.Source("path", children[0])

    def tune_names(self, children):
        return tuple(children)

    @v_args(meta=True)
    def region(self, meta, children):
        if children[4] is None:         # (x0, y0, x1, y1)
            region = ast.Region(*children[:4])
        else:                           # (x0, y0, z0, x1, y1, z1)
            x0, y0, z0, x1, y1, z1 = children
            region = ast.Region(x0, y0, x1, y1, z0=z0, z1=z1)
        return _Clause("region", "REGION", region, meta)

    black = _constant(ast.Color("black"))
    gray = _constant(ast.Color("gray"))
    mean = _constant(ast.Color("mean"))

    def intensity(self, children):
        return ast.Color("value", (float(children[0]),))

    def rgb(self, children):
        return ast.Color("rgb", tuple(float(c) for c in children))

    def label_index(self, children):
        return ast.Label("index", children[0])

    def label_name(self, children):
        return ast.Label("name", children[0])

    label_predicted = _constant(ast.Label("predicted"))

    def label_list(self, children):
        if len(children) == 1:
            return children[0]
        return ast.Label("list", tuple(children))

    def label_top(self, children):
        return ast.Label("top", children[0])

    label_all = _constant(ast.Label("all"))

    # -- EXPLAIN, DESCRIBE, SHOW, LOAD

    def explain(self, children):
        return ast.Explain(children[0], analyze=False)

    def explain_analyze(self, children):
        return ast.Explain(children[0], analyze=True)

    @v_args(meta=True)
    def describe(self, meta, children):
        model, *clauses = children
        found = self._clauses(clauses)
        if "patch" in found or "stride" in found:
            self._require(found, ("patch", "stride"), meta)
        return ast.Describe(model, **{key: clause.value for key, clause in found.items()})

    show_models = _constant(ast.ShowModels())
    show_images = _constant(ast.ShowImages())
    show_settings = _constant(ast.ShowSettings())
    show_calibrations = _constant(ast.ShowCalibrations())

    def load_image(self, children):
        return ast.LoadImage(*children)

    def load_model(self, children):
        path, name, *clauses = children
        found = self._clauses(clauses)
        return ast.LoadModel(path, name, **{key: clause.value for key, clause in found.items()})

    # -- SET, HELP

    def set(self, children):
        option, value = children
        # Option names are keyword-like: `SET Batch_Size = 8` sets batch_size.
        return ast.Set(option.lower(), value)

    def value_int(self, children):
        return children[0]

    value_float = value_string = value_int
    value_true = _constant(True)
    value_false = _constant(False)

    def help(self, children):
        topic = children[0]
        return ast.Help(topic.upper() if topic is not None else None)
