"""The subcommands of ``toolkit`` (one module each, ``register(subparsers)``), and the parser class they share."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any, NoReturn


class HelpFormatter(argparse.HelpFormatter):
    """argparse's wrapping without breaks at hyphens, so examples (``@heads=0-3``) and flags (``--local-attn-size``)
    in help texts stay whole and copy-paste; a description or epilog written with line breaks (examples) is kept as
    written."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:  # written with line breaks (an examples epilog): kept as written
            return "\n".join(indent + line for line in text.strip("\n").splitlines())
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False,
                             break_long_words=False)


class RawDescriptionHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (examples, tables), the options' help as :class:`HelpFormatter` wraps it, and a
    text of one paragraph (an option group's description) filled to the terminal's width."""

    _split_lines = HelpFormatter._split_lines
    _fill_text = HelpFormatter._fill_text


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line and exit 2, as every other user error (argparse prints the whole usage first,
    which for a subcommand is a screenful). Subparsers inherit the class, and with it help texts wrapped without
    breaks at hyphens."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raw = issubclass(kwargs.get("formatter_class", argparse.HelpFormatter), argparse.RawDescriptionHelpFormatter)
        kwargs["formatter_class"] = RawDescriptionHelpFormatter if raw else HelpFormatter
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
