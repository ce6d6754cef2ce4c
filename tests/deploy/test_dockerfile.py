"""The Dockerfile's contract, read as text (no Docker engine here): a CUDA base that matches the
torch build, Python 3.11, a non-root runtime, the INSTALL block scripts/check_deploy.sh runs, and
a build context (.dockerignore allowlist) that holds every package pyproject installs."""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _stages() -> list[list[str]]:
    """Instructions per build stage, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    stages: list[list[str]] = [[]]
    for line in joined.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith("FROM "):
            stages.append([])
        stages[-1].append(line.strip())
    return stages


def _install_block() -> list[str]:
    match = re.search(r"^RUN <<'INSTALL'\n(.*?)^INSTALL$", DOCKERFILE, re.M | re.S)
    assert match, "the Dockerfile lost its RUN <<'INSTALL' ... INSTALL block (check_deploy.sh)"
    return match[1].splitlines()


def test_cuda_base_matches_the_torch_build() -> None:
    image = re.search(r"^ARG CUDA_IMAGE=(\S+)$", DOCKERFILE, re.M)
    assert image, "ARG CUDA_IMAGE=nvidia/cuda:<version>-runtime-ubuntu<release> expected"
    tag = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu\d+\.\d+", image[1])
    assert tag, f"{image[1]} is not a CUDA runtime image on Ubuntu"
    try:
        bundled = version("nvidia-cuda-runtime")  # the CUDA runtime torch's wheel depends on
    except PackageNotFoundError:
        pytest.skip("torch here is not a CUDA build; nothing to compare the base image with")
    assert tuple(bundled.split(".")[:2]) == (tag[1], tag[2]), (
        f"base image CUDA {tag[1]}.{tag[2]} but torch is built for CUDA {bundled}"
    )


def test_multi_stage_non_root_runtime() -> None:
    stages = _stages()[1:]
    assert len(stages) >= 2, "build and runtime stages expected"
    runtime = stages[-1]
    users = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the runtime must not run as root"
    assert 'ENTRYPOINT ["hmkd"]' in runtime
    assert any(line.startswith("VOLUME") and "/data" in line for line in runtime)
    assert any(line.startswith("ENV") and "HMKD_DATA_DIR=/data" in line for line in runtime)
    assert any(line.startswith("COPY --from=build /opt/venv") for line in runtime)


def test_python_is_the_one_pyproject_wants() -> None:
    required = PYPROJECT["project"]["requires-python"]
    assert required == ">=3.11"
    assert any("python3.11 python3.11-venv" in line for line in _stages()[1])
    assert _install_block()[1].startswith("python3.11 -m venv")


def test_install_block_installs_the_project_and_imports_its_services() -> None:
    block = "\n".join(_install_block())
    assert block.startswith("set -eu\n")
    # the project with its S3 extra: a cluster's artifacts may live in object storage
    assert '"$VENV/bin/pip" install --no-cache-dir ".[s3]"' in block
    assert "s3" in PYPROJECT["project"]["optional-dependencies"]
    assert "import api.app, worker.celery_app, boto3" in block
    assert "cd /" in block, "imports must come from the install, not from the source tree"
    assert "RUN <<'INSTALL'" in (ROOT / "scripts" / "check_deploy.sh").read_text()


def test_build_context_holds_every_installed_package() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore is an allowlist: `*` first, then `!` entries"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"]}
    patterns = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    for path in ROOT.iterdir():
        if (path / "__init__.py").exists() and any(fnmatch(path.name, p) for p in patterns):
            needed.add(path.name)
    assert needed <= allowed, f"add to .dockerignore: {sorted('!' + n for n in needed - allowed)}"
