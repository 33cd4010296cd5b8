"""`wildpdiff generate --frames`: unlabelled frames from files or folders."""

from __future__ import annotations

import json
import shutil

from safetensors import safe_open

from training.cli import main


def test_generate_reads_frames_from_a_folder(smoke_store, smoke_world, tmp_path, capsys):
    seen = json.loads((smoke_world / "tasks.json").read_text())["seen"][0]
    background = sorted((smoke_world / "backgrounds" / seen).glob("*.png"))[1]
    folder = tmp_path / "card"
    folder.mkdir()
    for path in sorted((smoke_world / "images" / seen).glob("*.png"))[:6]:
        shutil.copy(path, folder / path.name)
    (folder / "notes.txt").write_text("not a frame: skipped by suffix")
    args = ["generate", "--store", str(smoke_store), "--background", str(background), "--steps", "2"]
    assert main([*args, "--frames", str(folder), "--out", str(tmp_path / "a")]) == 0
    assert "6 unlabelled frames" in capsys.readouterr().out
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", "pt") as f:
        metadata = f.metadata()
    assert metadata["zerolabel_frames"] == "6" and metadata["policy_applied"] == "zerolabel"

    (folder / "broken.png").write_bytes(b"not a png")
    assert main([*args, "--frames", str(folder), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and err.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*args, "--frames", str(empty), "--out", str(tmp_path / "c")]) == 2
    assert "no image files" in capsys.readouterr().err
