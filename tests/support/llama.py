"""llama.cpp's ``llama-server`` in a local image, built once per machine from a pinned source.

Nothing can be pulled here, so there is no base image with a compiler: the server is built
on the host (cmake, g++) from the llama.cpp that the ``llama-cpp-python`` sdist vendors,
CPU only and portable, with ggml and llama linked in statically. The image is ``FROM
scratch``: the binary, exactly the shared libraries ``ldd`` lists, and the dynamic loader.

Its tag is a hash of the sdist's sha256 and the recipe below, so a changed recipe makes a
new image, and an existing tag means nothing is downloaded or built. The sdist and the build
tree live under ``~/.cache/gpu-agent-test/llama`` (``$XDG_CACHE_HOME`` if set), outside the
repository; a file lock there keeps two builds on one machine from racing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "BUILD_TOOLS",
    "IMAGE_REPOSITORY",
    "SDIST_SHA256",
    "SDIST_URL",
    "BuildToolsMissing",
    "EngineUnreachable",
    "cache_dir",
    "image_tag",
    "llama_server_image",
    "runtime_files",
]

SDIST_URL = (
    "https://files.pythonhosted.org/packages/ec/e9/"
    "e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/"
    "llama_cpp_python-0.3.36.tar.gz"
)
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
IMAGE_REPOSITORY = "gpu-agent-test/llama-server"

#: Inside the sdist: where llama.cpp is vendored.
_VENDORED = "vendor/llama.cpp"

#: CPU only, portable (no -march=native: the image may run on another CPU of this arch), no
#: network at build time (no prebuilt web UI from a hub, no TLS) and static ggml/llama.
_CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_VULKAN=OFF",
    "-DGGML_METAL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
)
_TARGET = "llama-server"
#: What the host needs to build the image (``.ci/run`` installs them).
BUILD_TOOLS = ("cmake", "g++", "make", "ldd")
_JOBS = "2"

#: No user database in a scratch image: the server runs as nobody by number.
_DOCKERFILE = 'FROM scratch\nCOPY rootfs/ /\nUSER 65534:65534\nENTRYPOINT ["/bin/llama-server"]\n'


class BuildToolsMissing(RuntimeError):
    """The image is not there and this host lacks what building it takes."""


class EngineUnreachable(RuntimeError):
    """No Docker engine answers on the socket: nothing is fetched or built then."""


def cache_dir() -> Path:
    """Where the sdist and the build tree are kept, outside the repository."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpu-agent-test" / "llama"


def image_tag() -> str:
    """``gpu-agent-test/llama-server:<hash12>``, the hash of the source and the recipe."""
    recipe = json.dumps(
        {
            "sdist": SDIST_SHA256,
            "cmake": _CMAKE_OPTIONS,
            "target": _TARGET,
            "dockerfile": _DOCKERFILE,
        },
        sort_keys=True,
    )
    return f"{IMAGE_REPOSITORY}:{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def llama_server_image(docker_socket: str, log: Path | None = None) -> str:
    """The image's tag, building it first if this engine lacks it (slow: once per machine).

    ``docker_socket`` is the engine's socket path; ``log`` gets the build's output
    (default: ``build.log`` in the cache).
    """
    tag = image_tag()
    docker = ["docker", "--host", f"unix://{docker_socket}"]
    # Else a missing image could not be told from a missing engine, and a wrong socket
    # would cost a download and a long build before failing.
    probe = subprocess.run(
        [*docker, "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        raise EngineUnreachable(f"no Docker engine at {docker_socket}: {probe.stderr.strip()}")
    if _image_exists(docker, tag):
        return tag
    if missing := [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]:
        raise BuildToolsMissing(f"building {tag} needs {', '.join(missing)}")
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / "lock"):
        if _image_exists(docker, tag):  # another process built it while we waited
            return tag
        log = log or cache / "build.log"
        server = _build_server(cache, tag.rsplit(":", 1)[1], log)
        _build_image(docker, tag, server)
    return tag


def runtime_files(binary: Path) -> list[Path]:
    """The shared libraries ``ldd`` lists for ``binary``, and its dynamic loader."""
    listed = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True)
    files = []
    for line in listed.stdout.splitlines():
        # "libm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x...)", "/lib64/ld-linux... (0x...)";
        # the vDSO ("linux-vdso.so.1 (0x...)") is the kernel's and has no file.
        words = line.split()
        if "=>" in words:
            path = words[words.index("=>") + 1]
        elif words and words[0].startswith("/"):
            path = words[0]
        else:
            continue
        if not path.startswith("/"):
            raise RuntimeError(f"ldd could not resolve a library of {binary}: {line.strip()}")
        files.append(Path(path))
    return files


def _image_exists(docker: list[str], tag: str) -> bool:
    probe = subprocess.run([*docker, "image", "inspect", tag], capture_output=True, check=False)
    return probe.returncode == 0


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_sdist(cache: Path) -> Path:
    """The pinned sdist, downloaded unless the cache holds it; its sha256 checked either way."""
    sdist = cache / SDIST_URL.rsplit("/", 1)[1]
    if not sdist.exists() or _sha256(sdist) != SDIST_SHA256:
        partial = sdist.with_name(sdist.name + ".part")
        with urllib.request.urlopen(SDIST_URL, timeout=60) as response, partial.open("wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        if (got := _sha256(partial)) != SDIST_SHA256:
            partial.unlink()
            raise RuntimeError(f"{SDIST_URL}: sha256 {got}, expected {SDIST_SHA256}")
        partial.replace(sdist)
    return sdist


def _unpack(sdist: Path, cache: Path) -> Path:
    """llama.cpp's source from the (checked) sdist, unpacked once, with tarfile's data filter."""
    source = cache / f"src-{SDIST_SHA256[:12]}"
    done = source / ".unpacked"
    if done.exists():
        return source / _VENDORED
    shutil.rmtree(source, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix="unpack-"))
    try:
        with tarfile.open(sdist) as archive:
            top = archive.getmembers()[0].name.split("/", 1)[0]
            prefix = f"{top}/{_VENDORED}/"
            wanted = [m for m in archive.getmembers() if m.name.startswith(prefix)]
            if not wanted:
                raise RuntimeError(f"{sdist.name} holds no {_VENDORED}")
            # The 'data' filter refuses absolute paths, links out of the tree, devices.
            archive.extractall(staging, members=wanted, filter="data")
        (staging / top).replace(source)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    done.touch()
    return source / _VENDORED


def _build_server(cache: Path, recipe: str, log: Path) -> Path:
    """Configure and build the one target; its binary."""
    source = _unpack(_fetch_sdist(cache), cache)
    build = cache / f"build-{recipe}"
    with log.open("w") as out:
        for argv in (
            ["cmake", "-S", str(source), "-B", str(build), *_CMAKE_OPTIONS],
            ["cmake", "--build", str(build), "--target", _TARGET, "-j", _JOBS],
        ):
            out.write(f"$ {' '.join(argv)}\n")
            out.flush()
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"llama-server build failed ({argv[1]}): see {log}")
    return build / "bin" / _TARGET


def _build_image(docker: list[str], tag: str, server: Path) -> None:
    """The scratch image: the server, its libraries where ldd found them, the loader."""
    with tempfile.TemporaryDirectory(prefix="llama-image-") as tmp:
        context = Path(tmp)
        rootfs = context / "rootfs"
        (rootfs / "bin").mkdir(parents=True)
        shutil.copy2(server, rootfs / "bin" / _TARGET)
        for library in runtime_files(server):
            # Copied to the path the loader will look at, as a file (symlinks resolved).
            destination = rootfs / library.relative_to("/")
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(library.resolve(), destination)
        (context / "Dockerfile").write_text(_DOCKERFILE)
        subprocess.run(
            [*docker, "build", "--quiet", "--label", f"llama-cpp-python.sdist={SDIST_SHA256}",
             "--tag", tag, str(context)],
            capture_output=True, check=True,
        )  # fmt: skip
