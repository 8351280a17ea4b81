"""The parser, tested as tables: tests/fixtures/parser/*.txt.

A fixture file is a list of entries separated by blank lines; lines starting
with ``#`` are notes. In an AST fixture an entry is a query followed by the
repr of the result on one line ending in ``;``. In an error fixture it is a
query followed by ``str(err)`` (position, message, the line and a caret), as the shell prints
it. To add a case, add an entry; the tests below do not change.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from kql import ast
from kql.errors import ParseError, PlanError
from kql.parser import parse, parse_script

FIXTURES = Path(__file__).parent / "fixtures" / "parser"
_ERROR_START = re.compile(r"^line \d+, column \d+: ")


def entries(name: str) -> list:
    """(query, expected) pairs of one fixture file, as pytest params with readable ids."""
    params = []
    for block in re.split(r"\n[ \t]*\n", (FIXTURES / name).read_text(encoding="utf-8")):
        lines = [line for line in block.splitlines() if not line.startswith("#")]
        if not lines:
            continue
        starts = [i for i, line in enumerate(lines) if _ERROR_START.match(line)]
        if starts:                      # error entry: the expected text is the last 3 lines
            split = starts[-1]
            expected = "\n".join(lines[split:])
        else:                           # AST entry: the expected repr is the last line
            split = len(lines) - 1
            expected = lines[split].removesuffix(";")
        query = "\n".join(lines[:split])
        params.append(pytest.param(query, expected, id=query.splitlines()[0][:60]))
    return params


def error_text(parse_function, query: str) -> str:
    with pytest.raises(ParseError) as info:
        parse_function(query)
    return str(info.value)


@pytest.mark.parametrize("query, expected", entries("select.txt"))
def test_select(query, expected):
    assert repr(parse(query)) == expected


@pytest.mark.parametrize("query, expected", entries("statements.txt"))
def test_statements(query, expected):
    assert repr(parse(query)) == expected


@pytest.mark.parametrize("query, expected", entries("scripts.txt"))
def test_scripts(query, expected):
    assert repr(parse_script(query)) == expected


@pytest.mark.parametrize("query, expected", entries("errors.txt"))
def test_errors(query, expected):
    assert error_text(parse, query) == expected


@pytest.mark.parametrize("query, expected", entries("script_errors.txt"))
def test_script_errors(query, expected):
    assert error_text(parse_script, query) == expected


# ---------------------------------------------------------------- beyond the tables

@pytest.mark.parametrize("text", ["", "   \n\t", "-- nothing\n-- at all", ";", ";;\n;"])
def test_empty_script_is_empty_list(text):
    assert parse_script(text) == []


@pytest.mark.parametrize("text", ["", "-- nothing", ";"])
def test_parse_needs_a_statement(text):
    with pytest.raises(ParseError) as info:
        parse(text)
    assert str(info.value).splitlines()[0] == "line 1, column 1: empty query; expected a statement (e.g. HELP)"


def test_error_fields():
    with pytest.raises(ParseError) as info:
        parse("SHOW MODELS;\nSELECT HEATMAP FROM cat USING vgg16 PATCH 16 STRID 4")
    err = info.value
    assert (err.line, err.column) == (2, 46)
    assert err.source_line == "SELECT HEATMAP FROM cat USING vgg16 PATCH 16 STRID 4"
    assert err.message.startswith("unexpected 'STRID' (did you mean STRIDE?); expected one of ")
    # The full list is kept even though the message shortens it.
    assert err.expected == ("APPROX", "BATCH", "COLOR", "DRILLDOWN", "EXACT", "GATES", "INTO", "LABEL", "NAIVE",
                            "NORMALIZE", "ON", "PATCH", "REGION", "RESAMPLE", "STRIDE", "WEIGHTS", "WINDOW",
                            "';'", "end of input")


def test_result_is_hashable_and_equal_across_case_and_spacing():
    a = parse("SELECT HEATMAP FROM cat USING vgg16 PATCH 16x16 STRIDE 4 COLOR (1, 2, 3)")
    b = parse("select   heatmap from cat\nusing vgg16 patch 16X16 stride 4 color (1,2,3);")
    assert a == b and hash(a) == hash(b)


# ---------------------------------------------------------------- sizes on 2 and 3 axes

def test_sizes_are_kept_as_written_and_expanded_per_model():
    one, two, three = (parse(f"SELECT HEATMAP FROM x USING m PATCH {p} STRIDE 2")
                       for p in ("8", "16x8", "4x8x8"))
    assert (one.patch, two.patch, three.patch) == ((8,), (16, 8), (4, 8, 8))
    assert (one.patch_for(2), one.patch_for(3), one.stride_for(3)) == ((8, 8), (8, 8, 8), (2, 2, 2))
    assert (two.patch_for(2), three.patch_for(3)) == ((16, 8), (4, 8, 8))


@pytest.mark.parametrize("query, ndim, message", [
    ("PATCH 8x8x8 STRIDE 4", 2, "PATCH 8x8x8 is a 3-D patch; the model takes 2-D images (3x224x224)"),
    ("PATCH 8 STRIDE 4x4x4", 2, "STRIDE 4x4x4 is a 3-D stride; the model takes 2-D images (3x224x224)"),
    ("PATCH 16x8 STRIDE 4", 3, "PATCH 16x8 is a 2-D patch; the model takes 3-D volumes (3x224x224)"),
])
def test_a_size_with_the_wrong_number_of_axes_is_refused(query, ndim, message):
    select = parse(f"SELECT HEATMAP FROM x USING m {query}")
    with pytest.raises(PlanError) as info:
        select.patch_for(ndim, (3, 224, 224)), select.stride_for(ndim, (3, 224, 224))
    assert str(info.value) == message


def test_regions_on_two_and_three_axes():
    flat = parse("SELECT HEATMAP FROM x USING m PATCH 8 STRIDE 4 REGION (1, 2, 30, 40)").region
    box = parse("SELECT HEATMAP FROM x USING m PATCH 8 STRIDE 4 REGION (1, 2, 3, 30, 40, 50)").region
    assert (flat.ndim, flat.bounds, flat.shape) == (2, ((2, 40), (1, 30)), (38, 29))
    assert (box.ndim, box.bounds, box.shape) == (3, ((3, 50), (2, 40), (1, 30)), (47, 38, 29))
    assert ast.Region.from_bounds(box.bounds) == box and ast.Region.from_bounds(flat.bounds) == flat


@pytest.mark.parametrize("query", [
    "SELECT HEATMAP FROM 'ct.nii.gz' USING r3d_18 PATCH 4x8x8 STRIDE 2 REGION (0, 8, 2, 32, 24, 30) COLOR -1000",
    "SELECT HEATMAP FROM ct USING m PATCH 8 STRIDE 4x4x2 COLOR MEAN INTO 'h.nii.gz'",
    "SELECT HEATMAP FROM cat USING m PATCH 16x16 STRIDE 4",
])
def test_select_text_round_trips_volume_queries(query):
    select = parse(query)
    assert parse(ast.select_text(select)) == select


def test_describe_and_tune_take_sizes_as_written():
    d = parse("DESCRIBE r3d_18 INPUT 16x112x112 PATCH 8 STRIDE 4")
    assert (d.input_size_for(3), d.patch_for(3), d.stride_for(3)) == ((16, 112, 112), (8, 8, 8), (4, 4, 4))
    t = parse("TUNE m ON ct PATCH 4x8x8")
    assert (t.patch_for(3), t.stride_for(3)) == ((4, 8, 8), None)


# ---------------------------------------------------------------- properties

_WORDS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True)
_KEYWORDS = st.sampled_from(["select", "mean", "GRAY", "patch", "stride", "on", "into", "as",
                             "model", "image", "help", "x", "x8"])


@settings(max_examples=60, deadline=None)
@given(image=_WORDS | _KEYWORDS, model=_WORDS | _KEYWORDS)
def test_any_word_is_a_name_where_a_name_stands(image, model):
    select = parse(f"SELECT HEATMAP FROM {image} USING {model} PATCH 16 STRIDE 4")
    assert (select.source, select.model) == (ast.Source("name", image), model)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(-999, 9999), w=st.integers(-999, 9999), x=st.sampled_from("xX"))
def test_sizes_are_height_by_width(h, w, x):
    select = parse(f"SELECT HEATMAP FROM cat USING m PATCH {h}{x}{w} STRIDE {h}")
    assert (select.patch, select.stride) == ((h, w), (h,))
    assert (select.patch_for(2), select.stride_for(2)) == ((h, w), (h, h))


@settings(max_examples=60, deadline=None)
@given(text=st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\n\r"),
                    max_size=20),
       quote=st.sampled_from("'\""))
def test_strings_round_trip_with_doubled_quotes(text, quote):
    literal = quote + text.replace(quote, quote * 2) + quote
    assert parse(f"LOAD IMAGE {literal} AS img") == ast.LoadImage(text, "img")
