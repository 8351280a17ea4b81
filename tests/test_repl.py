"""The ``kql`` command (kql.repl.main) against a fake connection.

The fake records what it runs and answers from a table, so these tests check
the shell itself: modes, prompts, error reports, exit statuses. One test runs
``python -m kql`` for real with a HELP statement, which needs no model.
"""
from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import pytest

from kql import ast
from kql.errors import PlanError, QueryInterrupted
from kql.repl import _scan, main

WELCOME = "kql 0.1.0: end statements with ';', HELP; lists them, quit leaves.\n"


class FakeConnection:
    """Answers SHOW MODELS and HELP; fails on purpose for some names."""

    def __init__(self):
        self.executed = []

    def execute(self, statement):
        self.executed.append(statement)
        if isinstance(statement, ast.ShowModels):
            return "vgg16\nresnet18"
        if isinstance(statement, ast.Help):
            return f"help on {statement.topic}"
        if isinstance(statement, ast.LoadImage) and statement.path == "missing.png":
            raise PlanError("image file 'missing.png' does not exist")
        if isinstance(statement, ast.Select):
            if statement.model == "boom":
                raise RuntimeError("model exploded")
            if statement.model == "slow":
                raise QueryInterrupted("stopped")
            if statement.model == "slower":
                raise KeyboardInterrupt
            return f"heatmap of {statement.source.value}"
        return None


class Lines(io.StringIO):
    """stdin for the shell; a None line stands for Ctrl-C at the prompt."""

    def __init__(self, *lines):
        super().__init__()
        self._lines = list(lines)

    def readline(self, *args):
        if not self._lines:
            return ""
        line = self._lines.pop(0)
        if line is None:
            raise KeyboardInterrupt
        return line + "\n"


def run(argv, stdin=""):
    """(exit status, stdout, stderr, statements executed)."""
    connection = FakeConnection()
    stdin = stdin if isinstance(stdin, io.StringIO) else io.StringIO(stdin)
    stdout, stderr = io.StringIO(), io.StringIO()
    status = main(argv, connection=connection, stdin=stdin, stdout=stdout, stderr=stderr)
    return status, stdout.getvalue(), stderr.getvalue(), connection.executed


def select(model, source="cat"):
    return f"SELECT HEATMAP FROM {source} USING {model} PATCH 16 STRIDE 4"


# ---------------------------------------------------------------- interactive

def test_interactive_keeps_going_after_errors():
    status, out, err, executed = run(["-i"], Lines(
        "SHOW MODELS;",
        "SHOW TABLES;",                                 # parse error
        "LOAD IMAGE 'missing.png' AS x;",               # KqlError
        select("boom") + ";",                           # unexpected exception
        "HELP",                                         # a statement over two lines
        "  patch;",
        "quit",
        "SHOW MODELS;",                                 # never read
    ))
    assert status == 0
    assert out == (WELCOME
                   + "kql> vgg16\nresnet18\n"
                   + "kql> kql> kql> "
                   + "kql>   -> help on PATCH\n"
                   + "kql> ")
    assert err == textwrap.dedent("""\
        error: line 1, column 6: unexpected 'TABLES'; expected one of CALIBRATIONS, IMAGES, MODELS or SETTINGS
        SHOW TABLES;
             ^
        error: image file 'missing.png' does not exist
        internal error: RuntimeError: model exploded (run with --debug for the traceback)
        """)
    assert [type(s).__name__ for s in executed] == ["ShowModels", "LoadImage", "Select", "Help"]


@pytest.mark.parametrize("model", ["slow", "slower"])
def test_interactive_interrupted_statement_then_continues(model):
    status, out, err, executed = run(["-i"], Lines(select(model) + "; SHOW MODELS;", "HELP;"))
    assert status == 0
    assert err == "interrupted\n"
    # The rest of the interrupted input is dropped; the next input runs.
    assert out == WELCOME + "kql> kql> help on None\nkql> "
    assert len(executed) == 2


def test_interactive_ctrl_c_at_the_prompt_clears_the_input():
    status, out, err, executed = run(["-i"], Lines("SHOW", None, "HELP;"))
    assert (status, err) == (0, "")
    assert out == WELCOME + "kql>   -> \nkql> help on None\nkql> "
    assert executed == [ast.Help()]


@pytest.mark.parametrize("lines, prompts", [
    (["", "   ", "-- just a comment", "exit"], 4),
    (["EXIT;"], 1),
    (["Quit ;"], 1),
    ([], 1),                                    # Ctrl-D
])
def test_interactive_leaves_without_running_anything(lines, prompts):
    assert run(["-i"], Lines(*lines)) == (0, WELCOME + "kql> " * prompts, "", [])


def test_interactive_strings_and_comments_do_not_end_a_statement():
    status, out, err, executed = run(["-i"], Lines(
        "LOAD IMAGE 'a;b.png' -- ;",
        "AS img;",
    ))
    assert executed == [ast.LoadImage("a;b.png", "img")]
    assert out == WELCOME + "kql>   -> kql> "


def test_interactive_debug_prints_the_traceback():
    status, out, err, executed = run(["-i", "--debug"], Lines(select("boom") + ";"))
    assert status == 0
    assert err.startswith("Traceback (most recent call last):\n")
    assert err.endswith("RuntimeError: model exploded\ninternal error: RuntimeError: model exploded\n")


# ---------------------------------------------------------------- -c, scripts, stdin

@pytest.mark.parametrize("statements, status, out, err, executed", [
    ("SHOW MODELS; HELP patch", 0, "vgg16\nresnet18\nhelp on PATCH\n", "", 2),
    ("SET batch_size = 8", 0, "", "", 1),
    ("", 0, "", "", 0),
    # The first error stops the script; what ran before it printed its result.
    ("SHOW MODELS; LOAD IMAGE 'missing.png' AS x; HELP", 1, "vgg16\nresnet18\n",
     "error: image file 'missing.png' does not exist\n", 2),
    (select("boom") + "; HELP", 1, "",
     "internal error: RuntimeError: model exploded (run with --debug for the traceback)\n", 1),
    (select("slow") + "; HELP", 130, "", "interrupted\n", 1),
    # A syntax error anywhere stops the script before it starts.
    ("HELP;\nSHOW MODELS;\nSHOW TABLES;", 1, "",
     "error: line 3, column 6: unexpected 'TABLES'; expected one of CALIBRATIONS, IMAGES, MODELS or SETTINGS\n"
     "SHOW TABLES;\n     ^\n", 0),
])
def test_command(statements, status, out, err, executed):
    result = run(["-c", statements])
    assert result[:3] == (status, out, err)
    assert len(result[3]) == executed


def test_script_file(tmp_path):
    script = tmp_path / "run.kql"
    script.write_text("-- a script\nSHOW MODELS;\n\nSELECT HEATMAP FROM 'cat.png'\n"
                      "  USING vgg16 PATCH 16 STRIDE 4;\n", encoding="utf-8")
    assert run([str(script)]) == (0, "vgg16\nresnet18\nheatmap of cat.png\n", "", [
        ast.ShowModels(),
        ast.Select(ast.Source("path", "cat.png"), "vgg16", (16,), (4,))])


def test_script_file_error_has_the_script_line(tmp_path):
    script = tmp_path / "bad.kql"
    script.write_text("SHOW MODELS;\n\nSELECT HEATMAP FROM cat USING vgg16 PATCH 16;\n")
    status, out, err, executed = run([str(script)])
    assert (status, out, executed) == (1, "", [])
    assert err.startswith("error: line 3, column 45: missing STRIDE clause (e.g. STRIDE 4)\n")


def test_missing_script_file(tmp_path):
    missing = tmp_path / "nope.kql"
    assert run([str(missing)]) == (
        2, "", f"error: cannot read script '{missing}': No such file or directory\n", [])


@pytest.mark.parametrize("argv", [[], ["-"]])
def test_piped_stdin_runs_as_a_script(argv):
    # A StringIO is not a terminal, so without -i the shell runs it as a script.
    assert run(argv, "SHOW MODELS;\nHELP") == (0, "vgg16\nresnet18\nhelp on None\n", "",
                                                [ast.ShowModels(), ast.Help()])


# ---------------------------------------------------------------- arguments

def test_version():
    assert run(["--version"]) == (0, "kql 0.1.0\n", "", [])


def test_help_lists_the_options():
    status, out, err, _ = run(["-h"])
    assert status == 0 and out.startswith("usage: kql ") and "-c STATEMENTS" in out


@pytest.mark.parametrize("argv, message", [
    (["-c", "HELP", "x.kql"], "give either -c or a script, not both"),
    (["-i", "-c", "HELP"], "-i cannot be combined with -c or a script"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments(argv, message):
    status, out, err, _ = run(argv)
    assert (status, out) == (2, "")
    assert err.startswith("usage: kql ") and err.endswith(f"kql: error: {message}\n")


# ---------------------------------------------------------------- statement ends

@pytest.mark.parametrize("text, has_content, complete", [
    ("", False, False),
    ("  -- comment; only\n", False, False),
    ("SHOW MODELS", True, False),
    ("SHOW MODELS;", True, True),
    ("SHOW MODELS;  -- done", True, True),
    ("SHOW MODELS; HELP", True, False),
    ("LOAD IMAGE 'a;", True, False),
    ("LOAD IMAGE 'it''s;' AS x;", True, True),
    ('LOAD IMAGE "a;" AS x', True, False),
    # Strings end at the line end, so a lost quote does not swallow the next ';'.
    ("LOAD IMAGE 'a\n;", True, True),
])
def test_scan(text, has_content, complete):
    assert _scan(text) == (has_content, complete)


# ---------------------------------------------------------------- the real thing

def test_python_dash_m_with_piped_help():
    from kql.help import help_text
    done = subprocess.run([sys.executable, "-m", "kql"], input="HELP patch;\n", text=True,
                          capture_output=True, timeout=120)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == help_text("PATCH") + "\n"
