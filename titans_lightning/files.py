"""Files written whole or not at all."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; when the block ends without an error,
    sync it and rename it onto ``path``. A crash, a kill or a full disk mid-write leaves the file
    that was there before (or none), never a truncated one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    try:
        with open(partial, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as file:
        file.write(text)


class UnreadableFile(ValueError):
    """A JSON file of the package's own that does not parse: cut short, or edited."""


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnreadableFile(f"{path} is not valid JSON ({error}): it was cut short or edited; "
                             "move it away (or delete it) so that it is made again") from None
