"""The ``kql`` command: an interactive shell, or a runner for scripts.

    kql                         interactive shell when stdin is a terminal
    kql -c 'SHOW MODELS; ...'   run statements and exit
    kql script.kql              run a script file ('-' reads stdin)
    echo 'HELP;' | kql          run statements piped on stdin
    kql serve [--host H] [--port P]   the web page (kql.web; a script named
                                "serve" runs as ./serve)

Scripts are parsed whole before anything runs, so a syntax error anywhere
stops the script before its first statement and line numbers are the
script's. Statements then run in order; the first error is printed to stderr
and the exit status is 1 (2 for bad arguments or an unreadable script, 130
after Ctrl-C, 0 otherwise).

The shell reads until a ``;`` ends the input outside strings and comments,
keeps going after errors, clears the input on Ctrl-C, stops a running
statement on Ctrl-C, and leaves on Ctrl-D, ``quit`` or ``exit``.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any, Callable, Optional, TextIO

from kql.errors import KqlError, ParseError
from kql.parser import parse_script

__all__ = ["main"]

PROMPT = "kql> "
CONTINUATION = "  -> "
HISTORY_FILE = "~/.kql_history"
_HISTORY_LENGTH = 1000

# Exit statuses.
OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130


def main(argv: Optional[list[str]] = None, *, connection: Any = None,
         stdin: Optional[TextIO] = None, stdout: Optional[TextIO] = None,
         stderr: Optional[TextIO] = None) -> int:
    """Run the ``kql`` command and return its exit status.

    Args:
        argv: the arguments after the program name; ``None`` for ``sys.argv[1:]``.
        connection: an object with ``execute(statement)`` returning something
            to print (or ``None``); ``None`` to open ``kql.connect()``.
        stdin, stdout, stderr: the streams; ``None`` for the ``sys`` ones.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from kql.web import main as serve
        return serve(argv[1:])
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr

    parser = _argument_parser()
    try:
        args = parser.parse_args(argv)
        if args.interactive and (args.command is not None or args.script is not None):
            parser.error("-i cannot be combined with -c or a script")
        if args.command is not None and args.script is not None:
            parser.error("give either -c or a script, not both")
    except _UsageError as e:
        stderr.write(f"{parser.format_usage()}kql: error: {e}\n")
        return USAGE
    if args.help:
        stdout.write(parser.format_help())
        return OK
    if args.version:
        stdout.write(f"kql {_version()}\n")
        return OK

    shell = _Shell(connection, stdout, stderr, debug=args.debug)
    try:
        if args.interactive or (args.command is None and args.script is None and _isatty(stdin)):
            return shell.interactive(stdin)
        if args.command is not None:
            text = args.command
        elif args.script is not None and args.script != "-":
            try:
                with open(args.script, encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                stderr.write(f"error: cannot read script '{args.script}': {e.strerror or e}\n")
                return USAGE
        else:
            text = stdin.read()
        return shell.script(text)
    except KeyboardInterrupt:
        stderr.write("interrupted\n")
        return INTERRUPTED
    finally:
        shell.close()


# ---------------------------------------------------------------- arguments

class _UsageError(Exception):
    pass


class _ArgumentParser(argparse.ArgumentParser):
    # argparse prints to sys.stderr and exits; main() writes to its own streams.
    def error(self, message):
        raise _UsageError(message)


def _argument_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="kql", add_help=False,
        description="KQL: declarative occlusion-based explanations of CNN predictions.",
        epilog="Inside the shell, HELP; lists the statements. `kql serve --help`: the web page.")
    parser.add_argument("script", nargs="?", help="a file of KQL statements ('-' for stdin)")
    parser.add_argument("-c", dest="command", metavar="STATEMENTS", help="run these statements and exit")
    parser.add_argument("-i", "--interactive", action="store_true",
                        help="run the shell even if stdin is not a terminal")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of errors")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("kql")
    except PackageNotFoundError:
        return "unknown"


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------- running

class _Shell:
    """Runs statements against one connection and reports the outcome."""

    def __init__(self, connection: Any, stdout: TextIO, stderr: TextIO, debug: bool):
        self._connection = connection
        self._owns_connection = connection is None
        self.stdout = stdout
        self.stderr = stderr
        self.debug = debug

    def connection(self) -> Any:
        if self._connection is None:
            import kql
            self._connection = kql.connect()
        return self._connection

    def close(self) -> None:
        if self._owns_connection and self._connection is not None:
            close = getattr(self._connection, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:  # leaving anyway; a close error is not the user's business
                    pass

    # -- modes

    def script(self, text: str) -> int:
        """Parse all of ``text``, then run its statements until the first error."""
        try:
            statements = parse_script(text)
        except ParseError as e:
            self.report(e)
            return FAILED
        for statement in statements:
            status = self.run(statement)
            if status != OK:
                return status
        return OK

    def interactive(self, stdin: TextIO) -> int:
        """The read-eval-print loop; returns when the user leaves."""
        tty = stdin is sys.stdin and self.stdout is sys.stdout and _isatty(stdin)
        read = _terminal_reader() if tty else _stream_reader(stdin, self.stdout)
        save_history = _load_history() if tty else None
        try:
            if self.attempt(self.connection) != OK:
                return FAILED
            self.stdout.write(f"kql {_version()}: end statements with ';', HELP; lists them, "
                              "quit leaves.\n")
            buffer: list[str] = []
            while True:
                try:
                    line = read(CONTINUATION if buffer else PROMPT)
                except EOFError:
                    if tty:
                        self.stdout.write("\n")
                    return OK
                except KeyboardInterrupt:
                    # Ctrl-C at the prompt drops what was typed so far.
                    self.stdout.write("\n")
                    buffer.clear()
                    continue
                if not buffer and line.strip().rstrip(";").strip().lower() in ("quit", "exit"):
                    return OK
                buffer.append(line)
                has_content, complete = _scan("\n".join(buffer))
                if not has_content:
                    buffer.clear()      # blank lines and comments alone run nothing
                    continue
                if complete:
                    text = "\n".join(buffer)
                    buffer.clear()
                    self.script(text)
        finally:
            if save_history is not None:
                save_history()

    # -- one statement

    def run(self, statement: Any) -> int:
        """Execute one statement and print its result (if not None)."""
        def execute() -> None:
            result = self.connection().execute(statement)
            from kql.jobs.batch import BatchJob
            if isinstance(result, BatchJob):
                try:     # a multi-image query: a line per image as it finishes
                    for item in result:
                        self.stdout.write(f"{item}\n")
                        self.stdout.flush()
                finally:
                    result.close()
                    self.stdout.write(f"{result}\n")
                    self.stdout.flush()
                return
            if result is not None:
                self.stdout.write(f"{result}\n")
                self.stdout.flush()
        return self.attempt(execute)

    def attempt(self, action: Callable[[], Any]) -> int:
        """Call ``action``; report an error or Ctrl-C and return the exit status."""
        try:
            action()
            return OK
        except KeyboardInterrupt:   # also kql.errors.QueryInterrupted
            self.stdout.flush()
            self.stderr.write("interrupted\n")
            self.stderr.flush()
            return INTERRUPTED
        except Exception as e:
            self.report(e)
            return FAILED

    def report(self, error: BaseException) -> None:
        self.stdout.flush()
        if self.debug:
            traceback.print_exception(type(error), error, error.__traceback__, file=self.stderr)
        if isinstance(error, KqlError):     # a ParseError's text ends with the line and a caret
            text = f"error: {error}"
        else:
            text = f"internal error: {type(error).__name__}: {error}"
            if not self.debug:
                text += " (run with --debug for the traceback)"
        self.stderr.write(text + "\n")
        self.stderr.flush()


# ---------------------------------------------------------------- input

def _scan(text: str) -> tuple[bool, bool]:
    """(has a token, ends with ';') for ``text``, ignoring strings and comments.

    Strings do not span lines in KQL, so an open quote ends at the newline: a
    forgotten quote gives an error on the next ';' instead of a shell that
    waits forever.

    >>> _scan("SHOW MODELS; -- done")
    (True, True)
    >>> _scan("LOAD IMAGE 'a;b")
    (True, False)
    >>> _scan("  -- only a comment")
    (False, False)
    """
    last = ""
    quote = ""
    i = 0
    while i < len(text):
        char = text[i]
        if quote:
            if char == quote or char == "\n":
                quote = ""          # a doubled quote closes and reopens: same result
        elif char in "'\"":
            quote = last = char
        elif text.startswith("--", i):
            newline = text.find("\n", i)
            i = len(text) if newline < 0 else newline
            continue
        elif not char.isspace():
            last = char
        i += 1
    return bool(last), last == ";" and not quote


def _stream_reader(stdin: TextIO, stdout: TextIO) -> Callable[[str], str]:
    def read(prompt: str) -> str:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")
    return read


def _terminal_reader() -> Callable[[str], str]:
    return input        # uses readline (history, editing) once it is imported


def _load_history() -> Optional[Callable[[], None]]:
    """Load ~/.kql_history into readline; return a function that saves it. Best effort."""
    try:
        import readline
    except ImportError:
        return None
    path = os.path.expanduser(HISTORY_FILE)
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(_HISTORY_LENGTH)

    def save() -> None:
        try:
            readline.write_history_file(path)
        except OSError:
            pass
    return save
