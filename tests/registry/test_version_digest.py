"""A version carries the digest of its files as registered; every host's download is checked against it, so damaged
or replaced files in the artifact store are refused rather than served."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.model_files import TAG_FILES_DIGEST
from support.common import LABELS, SMALL_SETTINGS


def test_a_download_whose_files_differ_from_the_registered_ones_is_refused(
        store: str, checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from registry.register import register_checkpoint
    from registry.resolve import DigestMismatch, download_version
    from registry.store import open_client

    register_checkpoint("digest", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    client = open_client(store)
    version = client.get_model_version("digest", "1")
    assert len(version.tags[TAG_FILES_DIGEST]) == 64
    first = download_version(client, "models:/digest/1")  # this host's cache, checked
    assert first.files.digest() == version.tags[TAG_FILES_DIGEST]

    [stored] = [path for path in Path(store.removeprefix("sqlite:///")).parent.rglob("labels.json")
                if first.model_dir not in path.parents]  # the artifact store's copy, not the cache's
    good = stored.read_bytes()
    stored.write_bytes(good.replace(b"circle", b"square"))
    monkeypatch.setenv("LANTERN_HOME", str(tmp_path / "another-host"))  # its own, empty cache
    with pytest.raises(DigestMismatch, match=r"models:/digest/1 .* not the ones registered"):
        download_version(open_client(store), "models:/digest/1")
    assert not list((tmp_path / "another-host").rglob("labels.json"))  # nothing was cached
    stored.write_bytes(good)
    assert download_version(open_client(store), "models:/digest/1").files.digest() == version.tags[TAG_FILES_DIGEST]
