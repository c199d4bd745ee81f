"""Files written whole or not at all: what a crash mid-write leaves."""
import pytest

from titans_lightning.files import UnreadableFile, atomic_file, read_json, write_text_atomic


def test_a_write_that_fails_midway_leaves_the_file_that_was_there(tmp_path):
    path = tmp_path / "record.json"
    write_text_atomic(path, '{"test_mse": 0.0159}')
    with pytest.raises(OSError, match="disk full"):
        with atomic_file(path) as file:
            file.write('{"test_m')
            raise OSError("disk full")
    assert read_json(path) == {"test_mse": 0.0159}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no partial file left


def test_a_new_file_appears_only_when_whole(tmp_path):
    path = tmp_path / "deeper" / "result.json"
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(path) as file:
            file.write("{")
            raise KeyboardInterrupt
    assert list((tmp_path / "deeper").iterdir()) == []
    write_text_atomic(path, "[1, 2]")
    assert read_json(path) == [1, 2]


def test_a_file_cut_short_is_named_with_what_to_do(tmp_path):
    path = tmp_path / "attempts.json"
    path.write_text('[{"exit": 0, "wall')
    with pytest.raises(UnreadableFile, match=r"attempts\.json is not valid JSON .*move it away"):
        read_json(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(UnreadableFile, match="not valid JSON"):
        read_json(path)
