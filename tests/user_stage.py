"""`tox -e user`: install the package as a user does, then run the CLI journeys in that install.

1. A fresh ``python -m venv`` (with the pip it ships, as a user's ``python3 -m venv``), ``torch==2.13.0``
   first (any other torch spec pulls the multi-GB CUDA build), then ``pip install '<project>[s3,gcs]'``:
   a real, non-editable install, no dev extra. The project is copied first (only what a build reads), so
   files of earlier builds in the work tree (``build/``, ``*.egg-info``) cannot reach the wheel.
2. The test process gets only pytest, pytest-timeout and boto3 (the tests' admin client), with every
   package the user install chose pinned: a test tool may add packages, never change one.
3. The servers (moto, gcp-storage-emulator) live in a virtual environment of their own, put on PATH, so
   none of their dependencies can supply one the package forgot to declare.
4. Checked before the tests: ``ml_playground`` imports from that venv's site-packages, and no dev-only
   package is importable there.
5. ``pytest -m journey`` over the test files that use the marker; extra arguments go to pytest.

Usage: ``python tests/user_stage.py WORK_DIR SERVERS_DIR [PYTEST_ARGS...]``. WORK_DIR is emptied first;
SERVERS_DIR is reused when it already holds both servers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"
TEST_TOOLS = ["pytest>=8", "pytest-timeout>=2.3", "boto3"]
SERVERS = ["moto[server]>=5.0", "gcp-storage-emulator>=2026.7"]
# in the dev extra, not a runtime need: none of these may be importable where the journeys run
DEV_ONLY = ["hypothesis", "psutil", "safetensors", "mypy", "ruff", "moto", "gcp_storage_emulator"]
BUILD_INPUTS = ["pyproject.toml", "README.md", "LICENSE", "src"]


def step(what: str, argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    print(f"user stage: {what}", flush=True)
    done = subprocess.run(argv, text=True, check=False, **kwargs)
    if done.returncode != 0:
        sys.exit(f"user stage: {what} failed (exit {done.returncode})")
    print(f"user stage: {what}: {time.monotonic() - started:.0f} s", flush=True)
    return done


def fresh_venv(path: Path) -> Path:
    # the base interpreter's venv module, also when this script runs inside a virtualenv
    step(f"python -m venv {path}", [sys.executable, "-m", "venv", "--clear", str(path)])
    return path / "bin" / "python"


def pinned(python: Path) -> list[str]:
    """``name==version`` of every package in the venv (the project itself excluded: it is no index's)."""
    frozen = step("pip freeze", [str(python), "-m", "pip", "freeze"], capture_output=True).stdout
    return [line for line in frozen.splitlines() if "==" in line and not line.lower().startswith("ml_playground")]


def servers_bin(path: Path) -> Path:
    scripts = [path / "bin" / "moto_server", path / "bin" / "gcp-storage-emulator"]
    if not all(script.exists() for script in scripts):
        python = fresh_venv(path)
        step("install the servers", [str(python), "-m", "pip", "install", "--quiet", *SERVERS])
    return path / "bin"


def main(argv: list[str]) -> int:
    work, servers, pytest_args = Path(argv[0]).resolve(), Path(argv[1]).resolve(), argv[2:]
    shutil.rmtree(work, ignore_errors=True)
    project = work / "project"
    project.mkdir(parents=True)
    for name in BUILD_INPUTS:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, project / name)

    venv = work / "venv"
    python = fresh_venv(venv)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    step(f"pip install {TORCH}", [*pip, TORCH])
    step("pip install '.[s3,gcs]'", [*pip, f"{project}[s3,gcs]"])
    constraints = work / "user-install.txt"
    constraints.write_text("\n".join(pinned(python)) + "\n", encoding="utf-8")
    step("install the test tools", [*pip, "-c", str(constraints), *TEST_TOOLS])

    probe = (
        "import importlib.util, ml_playground\n"
        "print(ml_playground.__file__)\n"
        f"print(*(m for m in {DEV_ONLY!r} if importlib.util.find_spec(m)))\n"
    )
    found = subprocess.run([str(python), "-c", probe], cwd=ROOT, capture_output=True, text=True, check=False)
    imported_from, dev_only = [*found.stdout.splitlines(), "?", ""][:2] if found.returncode == 0 else ("?", "")
    if venv not in Path(imported_from).parents:
        sys.exit(f"user stage: ml_playground was imported from {imported_from}, not from {venv}: {found.stderr}")
    if dev_only:
        sys.exit(f"user stage: dev-only packages are installed where the journeys run: {dev_only}")
    print(f"user stage: ml_playground imports from {Path(imported_from).parent}", flush=True)
    print(f"user stage: none of {', '.join(DEV_ONLY)} is installed there", flush=True)

    journeys = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").rglob("test_*.py")
        if "pytest.mark.journey" in path.read_text(encoding="utf-8")
    )
    env = dict(os.environ, PATH=f"{servers_bin(servers)}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PYTHONPATH", None)
    tests = subprocess.run([str(python), "-m", "pytest", "-m", "journey", *journeys, *pytest_args], cwd=ROOT, env=env)
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
