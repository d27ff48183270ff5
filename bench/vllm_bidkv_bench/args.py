"""Argument types shared by the ``vllm-bidkv bench`` subcommands: a bad value is a usage error
naming the option (argparse exits 2 with the message), never a traceback from inside a run."""

from __future__ import annotations

import argparse
import math


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


def positive_float(text: str) -> float:
    """A finite number > 0 (``inf`` and ``nan`` parse as floats, and would run forever or never)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number > 0")
    return value


def positive_float_list(text: str) -> list[float]:
    """Comma-separated finite numbers > 0, e.g. ``2,3.8,5.7``."""
    return [positive_float(part) for part in text.split(",")]


def byte_size(text: str) -> int:
    """A size as the config's ``cpu_bytes`` takes it: bytes, or a number with a unit (``512MiB``)."""
    from vllm_bidkv.config import BidKVConfig

    try:
        return BidKVConfig(cpu_bytes=text).cpu_bytes
    except ValueError as err:
        # The config's message names its own key; keep what it accepts ("expected ...").
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; {str(err).partition('; ')[2]}") from None
