"""The on-disk model store (docs/design.md, the store): a folder of safetensors/JSON files plus `manifest.json`.

The manifest records the format version, provenance (creation time, code version), the profile, the class
names, every component's config and, for every file, its sha256 and size. Every read goes through the
manifest: a file that is unlisted, missing, truncated or altered is refused with a `StoreError` naming it.

Writes are atomic (temp file in the same folder, fsync, `os.replace`), so a crash leaves either the old
file or the new one, never half of one. A kill inside a write can leave its temp file (`.<name>.<random>.tmp`):
no read sees it (reads go through the manifest), and `Store.remove_temp_files` deletes such leftovers when a
stage starts again. Weights are safetensors only: nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import safetensors.torch
import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TEMP_PATTERN = ".*.tmp"  # every temp file or folder a write makes in the store (`atomic_write_bytes`)


class StoreError(Exception):
    """A store that is missing, corrupt or incomplete; the message names the file and the problem."""


# -----------------------------------------------------------------------------
# atomic writes and safetensors helpers


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # TEMP_PATTERN
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # a restarted stage may have removed it already
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors serialisation with the header's keys sorted, so equal inputs give equal bytes.

    safetensors writes `__metadata__` in Rust HashMap order, which changes from one process to the next.
    """
    data = safetensors.torch.save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header with spaces to 8-byte alignment
    return len(header).to_bytes(8, "little") + header + data[8 + n :]


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's bytes (empty when there is none)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {})


def atomic_save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def code_version() -> str:
    try:
        return importlib.metadata.version("wild-p-diff")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# -----------------------------------------------------------------------------
# the store


class Store:
    """Handle on a store folder. `Store(root)` reads the manifest; `Store.open` also verifies every file."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise StoreError(f"{self.root}: store folder does not exist")
        manifest_path = self.root / MANIFEST
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise StoreError(f"{manifest_path}: manifest is missing (incomplete store?)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{manifest_path}: manifest is not valid JSON ({e})") from None
        version = self.manifest.get("format_version") if isinstance(self.manifest, dict) else None
        if version != FORMAT_VERSION:
            raise StoreError(f"{manifest_path}: format_version {version!r}, this code reads {FORMAT_VERSION}")

    @classmethod
    def create(cls, root: str | Path, *, profile: str = "", classes: Sequence[str] = ()) -> Store:
        """A new, empty store. Refuses a folder that already holds one, rather than orphan its files."""
        root = Path(root)
        if (root / MANIFEST).exists():
            raise StoreError(f"{root / MANIFEST}: a store already exists here; open it with Store(root)")
        manifest = {
            "format_version": FORMAT_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "code_version": code_version(),
            "profile": profile,
            "classes": list(classes),
            "components": {},
            "files": {},
        }
        atomic_write_json(root / MANIFEST, manifest)
        return cls(root)

    @classmethod
    def open(cls, root: str | Path, required: Iterable[str] = ()) -> Store:
        store = cls(root)
        store.verify(required)
        return store

    # --- paths and manifest

    def path(self, relpath: str) -> Path:
        return self.root / _clean(relpath)

    def has(self, relpath: str) -> bool:
        return _clean(relpath) in self.manifest["files"]

    def update(self, **fields) -> None:
        """Set top-level manifest keys (e.g. `lora=layout.to_dict()`)."""
        if {"files", "format_version"} & fields.keys():
            raise ValueError("'files' and 'format_version' are kept by the store itself")
        self.manifest.update(fields)
        self._write_manifest()

    def set_component(self, name: str, config: dict) -> None:
        self.manifest["components"][name] = config
        self._write_manifest()

    def register(self, *relpaths: str) -> None:
        """Record files already written into the store (e.g. by worker processes); one manifest write."""
        for relpath in relpaths:
            path = self.path(relpath)
            if not path.is_file():
                raise StoreError(f"{path}: cannot register, file does not exist")
            entry = {"sha256": sha256_file(path), "size": path.stat().st_size}
            self.manifest["files"][_clean(relpath)] = entry
        self._write_manifest()

    def _write_manifest(self) -> None:
        atomic_write_json(self.root / MANIFEST, self.manifest)

    def remove_temp_files(self, folder: str = "") -> int:
        """Delete the temp files (and folders) that writes killed midway left under `folder` (default: the whole
        store); returns how many. Call it only where nothing else writes there at the time: a stage's start,
        or a zoo run's own folder."""
        top = self.path(folder) if folder else self.root
        leftovers = list(top.rglob(TEMP_PATTERN)) if top.is_dir() else []
        for path in leftovers:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return len(leftovers)

    # --- writing

    def save_tensors(
        self, relpath: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> None:
        atomic_save_tensors(self.path(relpath), tensors, metadata)
        self.register(relpath)

    def save_json(self, relpath: str, obj) -> None:
        atomic_write_json(self.path(relpath), obj)
        self.register(relpath)

    # --- reading (always verified against the manifest)

    def load_tensors(self, relpath: str) -> dict[str, torch.Tensor]:
        return safetensors.torch.load(self._read_verified(relpath))

    def tensor_metadata(self, relpath: str) -> dict[str, str]:
        return safetensors_metadata(self._read_verified(relpath))

    def load_json(self, relpath: str):
        return json.loads(self._read_verified(relpath))

    def verify(self, required: Iterable[str] = ()) -> None:
        """Check that the `required` files are listed and that every listed file is intact."""
        for relpath in required:
            if not self.has(relpath):
                raise StoreError(f"{self.path(relpath)}: required file is not in the manifest (incomplete?)")
        for relpath in self.manifest["files"]:
            self._check(relpath, self._read(relpath))

    def _read(self, relpath: str) -> bytes:
        path = self.path(relpath)
        if not self.has(relpath):
            raise StoreError(f"{path}: file is not listed in the manifest")
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{path}: file listed in the manifest is missing on disk") from None

    def _check(self, relpath: str, data: bytes) -> None:
        path, expected = self.path(relpath), self.manifest["files"][_clean(relpath)]
        if len(data) != expected["size"]:
            raise StoreError(f"{path}: size {len(data)} bytes, manifest says {expected['size']} (truncated?)")
        if hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise StoreError(f"{path}: sha256 does not match the manifest (file is corrupt or was modified)")

    def _read_verified(self, relpath: str) -> bytes:
        # Hash the very bytes we then parse, so the file cannot change between check and use.
        data = self._read(relpath)
        self._check(relpath, data)
        return data


def _clean(relpath: str) -> str:
    """Manifest key of a path inside the store; refuses paths that would escape the store folder."""
    path = PurePosixPath(relpath)
    if path.is_absolute() or ".." in path.parts or str(path) in ("", "."):
        raise StoreError(f"{relpath!r}: store paths must be relative and stay inside the store")
    return str(path)
