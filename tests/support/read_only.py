"""A directory nobody can write into, root included (the tests run as root in CI)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def read_only_dir(path: Path) -> Iterator[Path]:
    """``path`` created read-only: mode 0555, and immutable (``chattr +i``) when root, whom
    permissions do not stop. Fails (not skips) if a file can still be created in it."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    immutable = os.geteuid() == 0
    if immutable:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        probe = path / "probe"
        try:
            probe.touch()
        except OSError:
            pass
        else:
            raise AssertionError(f"{path} is still writable: the test would prove nothing")
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)
