"""The subcommands of ``toolkit`` (one module each, ``register(subparsers)``), and the parser class they share."""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line and exit 2, as every other user error (argparse prints the whole usage first,
    which for a subcommand is a screenful). Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
