"""How the llama-server image is made, short of building it: its tag follows the source and
the recipe, a source that is not the pinned one is refused, the unpacking stays in its tree,
and the image gets exactly the libraries ldd lists."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import pytest
from support import llama


def test_the_tag_is_a_hash_of_the_source_and_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    tag = llama.image_tag()
    assert re.fullmatch(r"gpu-agent-test/llama-server:[0-9a-f]{12}", tag)
    assert llama.image_tag() == tag
    monkeypatch.setattr(llama, "_CMAKE_OPTIONS", (*llama._CMAKE_OPTIONS, "-DGGML_AVX2=ON"))
    assert llama.image_tag() != tag
    monkeypatch.undo()
    monkeypatch.setattr(llama, "SDIST_SHA256", "0" * 64)
    assert llama.image_tag() != tag


def test_a_source_that_is_not_the_pinned_one_is_refused_and_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    impostor = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    impostor.write_bytes(b"not the sdist")
    monkeypatch.setattr(llama, "SDIST_URL", impostor.as_uri())
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(RuntimeError, match="sha256"):
        llama._fetch_sdist(cache)
    assert list(cache.iterdir()) == []


def _sdist(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for member in members:
            archive.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    return path


def test_unpacking_keeps_only_llama_cpp_and_refuses_a_link_out_of_the_tree(
    tmp_path: Path,
) -> None:
    top = "llama_cpp_python-0.3.36"
    source = tarfile.TarInfo(f"{top}/vendor/llama.cpp/CMakeLists.txt")
    source.size = 3
    other = tarfile.TarInfo(f"{top}/llama_cpp/__init__.py")
    other.size = 3
    cache = tmp_path / "good"
    cache.mkdir()
    unpacked = llama._unpack(_sdist(tmp_path / "good.tar.gz", [source, other]), cache)
    assert (unpacked / "CMakeLists.txt").read_bytes() == b"xxx"
    assert not (unpacked.parents[1] / "llama_cpp").exists()

    escape = tarfile.TarInfo(f"{top}/vendor/llama.cpp/escape")
    escape.type = tarfile.SYMTYPE
    escape.linkname = "/etc/passwd"
    cache = tmp_path / "bad"
    cache.mkdir()
    with pytest.raises(tarfile.FilterError):
        llama._unpack(_sdist(tmp_path / "bad.tar.gz", [source, escape]), cache)
    assert list(cache.iterdir()) == []  # the staging directory went too


def test_the_runtime_files_are_the_libraries_and_the_loader_ldd_lists() -> None:
    files = llama.runtime_files(Path("/bin/ls"))
    names = {path.name for path in files}
    assert "libc.so.6" in names
    assert any(name.startswith("ld-linux") for name in names)
    assert not any("vdso" in name for name in names)
    assert all(path.is_absolute() and path.exists() for path in files)
