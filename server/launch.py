"""Entry points of lstm-serve and lstm-model. A client-only install (`pip install lstm-stream`)
has these commands but not torch and the server's other packages: there each says, in one
line, which extra to install, instead of printing an ImportError's traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

EXTRA_HINT = "pip install 'lstm-stream[server]'"


def _run(program: str, load: Callable[[], Callable[[], int]]) -> int:
    try:
        main = load()
    except ModuleNotFoundError as exc:
        print(
            f"{program}: needs the server extra ({EXTRA_HINT}); this install has no "
            f"module {exc.name!r}",
            file=sys.stderr,
        )
        return 2
    return main()


def serve() -> int:
    def load():
        from server.app import main

        return main

    return _run("lstm-serve", load)


def model_tools() -> int:
    def load():
        from lstm_model.cli import main

        return main

    return _run("lstm-model", load)
