"""Paths as the python backend's stub can open them.

The stub embeds an isolated interpreter in the C locale (environment variables such as PYTHONUTF8 are
ignored): its file-system encoding is ASCII, so a path from a model's parameters holding é or 中 could
not be opened (a served artifact in such a directory failed to load: "no such model directory").
"""

from __future__ import annotations

import os
import shutil
import tempfile


def openable(path: str) -> bool:
    """Whether this interpreter can name `path` (encode it in its file-system encoding)."""
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        return False
    return True


class StubPaths:
    """Reaches paths the file-system encoding cannot name through ASCII symbolic links (made from the
    UTF-8 bytes, which need no encoding) in one private temporary directory; `close()` removes them."""

    def __init__(self) -> None:
        self.links: str | None = None
        self.named: dict[str, str] = {}  # link -> the path it stands for

    def __call__(self, path: str) -> str:
        if not path or openable(path):
            return path
        if self.links is None:
            parent = tempfile.gettempdir()  # (TMPDIR may hold what the links avoid)
            self.links = tempfile.mkdtemp(
                prefix="trtcompress-paths-", dir=parent if parent.isascii() else "/tmp"
            )
        target = path.encode("utf-8")  # (the encoding Triton's model config is in)
        link = os.path.join(self.links, str(len(os.listdir(self.links))))
        os.symlink(os.path.join(os.getcwdb(), target), link.encode("ascii"))  # (an absolute target stays)
        self.named[link] = path
        return link

    def restore(self, exc: BaseException) -> BaseException:
        """`exc` with the paths its message names as given, not as linked."""
        if len(exc.args) == 1 and isinstance(exc.args[0], str):
            text = exc.args[0]
            for link, path in self.named.items():
                text = text.replace(link, path)
            exc.args = (text,)
        return exc

    def close(self) -> None:
        if self.links is not None:
            shutil.rmtree(self.links, ignore_errors=True)  # the links only, never their targets
            self.links = None
            self.named = {}
