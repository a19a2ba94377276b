"""Server.start: what a start that fails leaves behind."""

from __future__ import annotations

import os

import pytest


def test_a_tritonserver_that_cannot_run_leaves_no_private_directory(tmp_path, monkeypatch):
    """A repository path the stub's shell cannot hold is linked from a private directory, made before
    tritonserver starts; a binary that could not be started (here: not an executable format) left that
    directory behind, as stop() is never called for a server that did not start, and its OSError reached
    the CLI as a traceback."""
    import tempfile

    from trtcompress.serve import ServeError, Server

    fake = tmp_path / "bin" / "tritonserver"
    fake.parent.mkdir()
    fake.write_bytes(b"\x7fELF not a binary")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("TRTCOMPRESS_BUNDLED_TRITON", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "my repo").mkdir()
    with pytest.raises(ServeError, match="cannot run tritonserver"):  # one line for the CLI, no traceback
        Server(tmp_path / "my repo", log_file=tmp_path / "tritonserver.log").start(timeout=5)
    assert list((tmp_path / "tmp").iterdir()) == []
