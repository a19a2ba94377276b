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


def test_a_stop_tritonserver_did_not_finish_cleanly_keeps_its_log(tmp_path):
    """serve exited 0 and deleted its temporary directory, the default log with it, when tritonserver
    crashed (-11) or was killed (-9) while stopping (a trtllm / llmapi model with a stream open)."""
    from trtcompress.cli_serve import _after_stop
    from trtcompress.errors import TrtcompressError

    work = tmp_path / "work"
    work.mkdir()
    for code in (-11, -9, 1):
        with pytest.raises(TrtcompressError, match=rf"did not stop cleanly \(exit code {code}\); its log: "):
            _after_stop(code, work, work / "tritonserver.log")
        assert work.is_dir()
    _after_stop(0, work, work / "tritonserver.log")
    assert not work.exists()
