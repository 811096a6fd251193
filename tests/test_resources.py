"""Carried files: from package data, and from the module the static build generates."""

import pytest

from agent import resources


def test_package_data_is_read():
    blob = resources.read_bytes("kexec/purgatory.bin")
    assert blob.count(b"NAPURG01") == 1  # the parameter block the loader patches
    assert resources.read_bytes("demo/demo.json").startswith(b"{")


def test_missing_file_is_a_clear_error():
    with pytest.raises(resources.ResourceMissingError, match="not part of this build"):
        resources.read_bytes("no/such.file")


def test_embedded_module_round_trips(monkeypatch):
    files = {"demo/demo.ndz": bytes(1 << 20), "kexec/purgatory.bin": bytes(range(256)) * 3}
    namespace = {}
    exec(resources.embed_module_source(files), namespace)
    packed = namespace["FILES"]
    assert len(packed["demo/demo.ndz"]) < 4096  # padding compresses away
    monkeypatch.setattr(resources, "_embedded", lambda: packed)
    for name, content in files.items():
        assert resources.read_bytes(name) == content
