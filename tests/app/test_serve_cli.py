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
