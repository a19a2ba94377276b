from pathlib import Path

from trtcompress.models.cache import cache_dir


def test_cache_dir_is_absolute_and_ignores_an_empty_or_relative_xdg_cache_home(tmp_path, monkeypatch):
    """XDG: an empty or relative XDG_CACHE_HOME is ignored; it would otherwise put a 540 MB conversion in
    `./trtcompress` of every directory a command runs from."""
    monkeypatch.delenv("TRTCOMPRESS_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    for xdg in ("", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
        assert cache_dir() == tmp_path / "home" / ".cache" / "trtcompress"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "trtcompress"
    monkeypatch.setenv("TRTCOMPRESS_CACHE", "rel")  # the path a relative setting names now
    assert cache_dir() == tmp_path / "rel" and Path(cache_dir()).is_absolute()
