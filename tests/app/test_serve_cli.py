"""`wildpdiff serve` refuses an unusable store with one line and exit status 2, before binding a port."""

from __future__ import annotations

import shutil

from training.cli import main


def test_serve_refuses_a_missing_store(tmp_path, capsys):
    assert main(["serve", "--store", str(tmp_path / "nowhere"), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and err.count("\n") == 1


def test_serve_refuses_a_corrupt_store(smoke_store, tmp_path, capsys):
    store = shutil.copytree(smoke_store, tmp_path / "store")
    backbone = store / "backbone.safetensors"
    data = backbone.read_bytes()
    backbone.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped
    assert main(["serve", "--store", str(store), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "backbone.safetensors" in err and "sha256" in err and err.count("\n") == 1


def test_serve_refuses_an_unreadable_keys_file(smoke_store, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WILDPDIFF_API_KEYS_FILE", str(tmp_path / "no-such-keys"))
    assert main(["serve", "--store", str(smoke_store), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: api_keys_file: cannot read") and err.count("\n") == 1


def test_torch_threads_default_leaves_one_core_to_the_event_loop(monkeypatch):
    from app.settings import Settings

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert Settings(_env_file=None).intra_op_threads() == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert Settings(_env_file=None).intra_op_threads() == 15
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert Settings(_env_file=None).intra_op_threads() == 1
    assert Settings(torch_threads=3, _env_file=None).intra_op_threads() == 3
