"""Logging set-up for the entry points (scripts/, experiments' commands)."""

import logging


def configure_logging(*names: str) -> None:
    """INFO messages of the loggers `names` (default: ctxjax's: base model reused, resumed from
    step N) on stderr; other libraries' at WARNING. `force`: an imported library (absl, through
    orbax) has already given the root logger a handler, which turns a plain basicConfig into a
    no-op and loses these messages."""
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", force=True)
    for name in names or ("ctxjax",):
        logging.getLogger(name).setLevel(logging.INFO)
