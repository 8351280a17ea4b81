"""``python -m kql``: the same as the ``kql`` command."""
from kql.repl import main

raise SystemExit(main())
