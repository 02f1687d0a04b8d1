"""Helpers shared by the package's command-line tools (`python -m bevt.convert`, `python -m bevt.data.make_shards`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["CLIArgumentParser"]


class CLIArgumentParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose `--dashed-flag` options may also be spelled `--dashed_flag`, the training scripts'
    style (which, as Transformers' `HfArgumentParser`, accept both too): one flag, two spellings, the same meaning.

    An underscore spelling is rewritten to the dashed one before parsing, so `--help`, error messages and unique
    prefixes (`--out` for `--output-dir`) stay as they were."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        known = self._option_string_actions
        for i, token in enumerate(argv):
            if token == "--":
                break
            name, sep, value = token.partition("=")
            if name.startswith("--") and "_" in name and name not in known:
                dashed = "--" + name[2:].replace("_", "-")
                if dashed in known:
                    argv[i] = dashed + sep + value
        return super().parse_known_args(argv, namespace)
