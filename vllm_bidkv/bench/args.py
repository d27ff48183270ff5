"""Argument types shared by the ``vllm-bidkv bench`` subcommands: a bad value is a usage error
naming the option (argparse exits 2 with the message), never a traceback from inside a run."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def positive_int_list(text: str) -> list[int]:
    """Comma-separated integers >= 1, e.g. ``16,64,256``."""
    return [positive_int(part) for part in text.split(",")]
