"""Fetch known models (GenderNet, AgeNet by Levi & Hassner) into a cache, verified by sha256.

Sources, tried in order:
  1. the original repository (GilLevi/AgeGenderDeepLearning, ``models/``);
  2. the ``damefaces==0.0.2.post9`` sdist on PyPI, via ``pip download``.
The cache is ``$CAFFE_COMPRESS_CACHE`` or ``~/.cache/caffe-compress``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import FetchError, UsageError

log = logging.getLogger(__name__)

UPSTREAM = "https://raw.githubusercontent.com/GilLevi/AgeGenderDeepLearning/master/models/"
DAMEFACES = "damefaces==0.0.2.post9"
DAMEFACES_DIR = "damefaces-0.0.2.post9/damefaces/"


@dataclass(frozen=True)
class Artifact:
    filename: str  # name in the cache
    sha256: str
    upstream: str  # file name in the original repository
    sdist_member: str  # path inside the damefaces sdist


@dataclass(frozen=True)
class KnownModel:
    name: str
    deploy: Artifact
    weights: Artifact
    description: str


MODELS = {
    "gendernet": KnownModel(
        name="gendernet",
        deploy=Artifact(
            "gender_deploy.prototxt",
            "c1961acc32e6e9ce855f6ec4973e9a939cc2d49089a8aaefeafa0e100fb110cc",
            "deploy_gender.prototxt",
            DAMEFACES_DIR + "bin/gender_deploy.prototxt",
        ),
        weights=Artifact(
            "gender_net.caffemodel",
            "ac7571b281ae078817764b645a20541bd6aa1babeac20a45e6d8de7d61ba0e50",
            "gender_net.caffemodel",
            DAMEFACES_DIR + "bin/gender_net.caffemodel",
        ),
        description="GenderNet (Levi & Hassner, CVPR-W 2015), trained on Adience",
    ),
    "agenet": KnownModel(
        name="agenet",
        deploy=Artifact(
            "age_deploy.prototxt",
            "af2a268d12bda7821140461319828a8560ce7739db9568d6b3827a60487a6333",
            "deploy_age.prototxt",
            DAMEFACES_DIR + "bin/age_deploy.prototxt",
        ),
        weights=Artifact(
            "age_net.caffemodel",
            "6dde5d07df5ca1d66ff39e525693f05ccfb9d2c437e188fdd1a10d42e57fabd6",
            "age_net.caffemodel",
            DAMEFACES_DIR + "bin/age_net.caffemodel",
        ),
        description="AgeNet (Levi & Hassner, CVPR-W 2015), 8 age groups, trained on Adience",
    ),
}

SAMPLE_PHOTOS = ("girl1.jpg", "girl2.jpg", "kid1.jpg", "kid2.jpg", "man1.jpg", "man2.jpg")


@dataclass(frozen=True)
class FetchedModel:
    name: str
    deploy: Path
    weights: Path
    samples: tuple[Path, ...]


def cache_dir() -> Path:
    root = os.environ.get("CAFFE_COMPRESS_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "caffe-compress"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified(path: Path, artifact: Artifact) -> bool:
    return path.is_file() and sha256_of(path) == artifact.sha256


def _install(src: Path, dest: Path, artifact: Artifact) -> bool:
    """Copy src into dest atomically if its checksum is right."""
    if sha256_of(src) != artifact.sha256:
        log.warning("%s: checksum mismatch, ignoring this copy", artifact.filename)
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return True


def _from_upstream(model: KnownModel, target: Path, timeout: float) -> bool:
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for art in (model.deploy, model.weights):
            dest = target / art.filename
            if _verified(dest, art):
                continue
            url = UPSTREAM + art.upstream
            log.info("trying %s", url)
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp, open(Path(tmp) / art.filename, "wb") as fh:
                    shutil.copyfileobj(resp, fh)
            except (OSError, ValueError) as exc:
                log.info("original repository not reachable: %s", exc)
                return False
            ok = _install(Path(tmp) / art.filename, dest, art) and ok
    return ok


def _from_sdist(models: list[KnownModel], target_root: Path) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, DAMEFACES]
        log.info("running %s", " ".join(cmd))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.info("pip download failed: %s", exc)
            return False
        archives = list(Path(tmp).glob("damefaces-*.tar.gz"))
        if proc.returncode != 0 or not archives:
            log.info("pip download failed: %s", proc.stderr.strip().splitlines()[-1:] or proc.returncode)
            return False
        wanted = {}
        for model in models:
            for art in (model.deploy, model.weights):
                wanted[art.sdist_member] = (target_root / model.name / art.filename, art)
        samples = {DAMEFACES_DIR + "files/" + s: target_root / "samples" / s for s in SAMPLE_PHOTOS}
        ok = True
        with tarfile.open(archives[0], "r:gz") as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                if member.name in wanted:
                    dest, art = wanted.pop(member.name)
                    extracted = Path(tmp) / "x" / Path(member.name).name
                    extracted.parent.mkdir(exist_ok=True)
                    with tar.extractfile(member) as src, open(extracted, "wb") as out:
                        shutil.copyfileobj(src, out)
                    ok = _install(extracted, dest, art) and ok
                elif member.name in samples:
                    dest = samples.pop(member.name)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
        return ok and not wanted


def fetch(name: str, *, root: Path | None = None, timeout: float = 20.0, try_upstream: bool = True) -> FetchedModel:
    """Make sure ``name`` is in the cache and return its verified paths."""
    if name not in MODELS:
        raise UsageError(f"fetch: unknown model '{name}' (known: {', '.join(sorted(MODELS))})")
    model = MODELS[name]
    root = root or cache_dir()
    target = root / name
    deploy, weights = target / model.deploy.filename, target / model.weights.filename

    def done() -> bool:
        return _verified(deploy, model.deploy) and _verified(weights, model.weights)

    try:
        if not done() and try_upstream:
            _from_upstream(model, target, timeout)
        if not done():
            # One sdist holds both models and the sample photos: cache them all.
            _from_sdist(list(MODELS.values()), root)
    except OSError as exc:
        raise FetchError(f"{root}: cannot write the model cache: {exc.strerror}") from None
    if not done():
        raise FetchError(
            f"{name}: could not download the model from the original repository or from PyPI "
            f"({DAMEFACES}); put {model.deploy.filename} (sha256 {model.deploy.sha256[:12]}...) and "
            f"{model.weights.filename} (sha256 {model.weights.sha256[:12]}...) into {target}/ by hand"
        )
    samples = tuple(p for p in (root / "samples" / s for s in SAMPLE_PHOTOS) if p.is_file())
    return FetchedModel(name, deploy, weights, samples)
