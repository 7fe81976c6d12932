"""Fixtures for fault injection: a private, editable copy of the small bundle per test."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from edge_runtime.bundle import MANIFEST, content_id, sha256_file


class NoAliasDumper(yaml.SafeDumper):
    """Writes a shared object twice instead of as an anchor and alias (the runtime refuses YAML aliases)."""

    def ignore_aliases(self, data) -> bool:
        return True


class BundleEditor:
    """Edits a bundle copy the way an attacker or a broken copy would: files, manifest, and re-pinned checksums."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def manifest(self) -> dict:
        return yaml.safe_load((self.root / MANIFEST).read_text())

    def save(self, manifest: dict, reid: bool = True) -> None:
        """Write the manifest; `reid` (default): with its bundle_id recomputed from the edited content, as an
        attacker who knows the format would, so that checks other than the id's can catch the edit."""
        if reid:
            manifest = dict(manifest, bundle_id=content_id(manifest))
        (self.root / MANIFEST).write_text(yaml.dump(manifest, Dumper=NoAliasDumper, sort_keys=False))

    def repin(self, rel: str) -> None:
        """Record `rel`'s current sha256 and size in the manifest, so only checks other than the checksum can catch it."""
        m = self.manifest()
        path = self.root / rel
        m["files"][rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        self.save(m)


@pytest.fixture
def bundle_copy(small_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(small_bundle, dst, symlinks=True)
    return dst


@pytest.fixture
def editor(bundle_copy: Path) -> BundleEditor:
    return BundleEditor(bundle_copy)
