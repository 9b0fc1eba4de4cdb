"""The package as a stranger gets it: a wheel and an sdist that carry every file the code reads
(the demo model included), pass ``twine check``, and run README's first command offline in a
fresh virtual environment."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import qconvert
from tests.conftest import REPO

DEMO_FILES = [
    "LICENSE", "PROVENANCE.md", "config.json", "generation_config.json", "model.safetensors",
    "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
]
# ignored by git (.gitignore), so absent from a fresh checkout
BUILD_LEFTOVERS = (".git", "*.egg-info", "build", "dist", "__pycache__", "*.pyc", ".venv", ".pytest_cache", "tmp", ".refs")
# shared/models/PROVENANCE.md: the stories260K weights
STORIES_SHA256 = "407a7c581bdd66972383ce9ad24857713fb98786d06ea564a2fe9b34ebe77dfd"


def package_files() -> list[str]:
    """Every file of the qconvert package in the source tree, as a path inside the wheel."""
    root = REPO / "qconvert"
    return sorted(
        p.relative_to(REPO).as_posix()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """``python -m build``: the sdist, then the wheel built from that sdist (so both are checked)."""
    pytest.importorskip("build", reason="needs the 'build' package (pip install -e '.[test]')")
    out = tmp_path_factory.mktemp("dist")
    # A clean copy, as CI checks it out: setuptools reads back a stale qconvert.egg-info/SOURCES.txt
    # (left by `pip install -e .` or an earlier build), which would hide files missing from package-data.
    src = out / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*BUILD_LEFTOVERS))
    # --no-isolation: the test extra already has setuptools and wheel, and no network is needed.
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("qconvert-*.whl")
    (sdist,) = out.glob("qconvert-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_wheel_carries_every_package_file_and_the_demo_model(dist):
    with zipfile.ZipFile(dist["wheel"]) as z:
        names = set(z.namelist())
        missing = [f for f in package_files() if f not in names]
        assert not missing, f"files of qconvert/ not in the wheel: {missing}"
        for f in [*(f"qconvert/demo/stories260K/{n}" for n in DEMO_FILES), "qconvert/data/calibration.txt"]:
            assert f in names
        weights = z.read("qconvert/demo/stories260K/model.safetensors")
        assert hashlib.sha256(weights).hexdigest() == STORIES_SHA256
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        assert re.search(r"^Version: (.+)$", z.read(metadata).decode(), re.M).group(1) == qconvert.__version__
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "qconvert = qconvert.cli:main" in z.read(entry_points).decode()


def test_sdist_carries_every_package_file(dist):
    with tarfile.open(dist["sdist"]) as t:
        top = t.getnames()[0].split("/")[0]
        names = {n.removeprefix(top + "/") for n in t.getnames()}
    missing = [f for f in package_files() + ["README.md", "pyproject.toml"] if f not in names]
    assert not missing, f"files not in the sdist: {missing}"


def test_twine_check_passes(dist):
    pytest.importorskip("twine", reason="needs the 'twine' package (pip install -e '.[test]')")
    proc = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(dist["wheel"]), str(dist["sdist"])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASSED") == 2, proc.stdout


@pytest.mark.slow
def test_readme_first_command_runs_from_the_wheel_in_a_fresh_venv(dist, tmp_path):
    """README's first command, with only its install part swapped for the built wheel, run from a
    folder outside the repository with no hub cache and the hub offline."""
    first = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)[0].strip()
    install, *steps = [s.strip() for s in first.split("&&")]
    assert install == "pip install -e ." and steps, first

    venv = tmp_path / "venv"
    # numpy, numba & co. come from this environment (no network); qconvert only from the wheel.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "empty-hf-home"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    work = tmp_path / "elsewhere"
    work.mkdir()

    def sh(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=300)

    proc = sh(f"pip install --no-deps --no-index '{dist['wheel']}'")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = sh("python -c 'import qconvert; print(qconvert.__file__)'")
    assert Path(proc.stdout.strip()).resolve().is_relative_to(venv.resolve()), proc.stdout + proc.stderr  # not this checkout
    proc = sh("qconvert --version")
    assert proc.stdout == f"qconvert {qconvert.__version__}\n", proc.stdout + proc.stderr

    proc = sh(" && ".join(steps))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "source: hf demo:stories260K" in proc.stdout
    assert re.search(r"model\.layers\.4\.self_attn\.v_proj\.weight\s+32x64\s+Q8_0", proc.stdout), proc.stdout
    assert "total: 47 tensors, 260,032 parameters" in proc.stdout
    # greedy, 30 tokens: Q8_0 gives what shared/models/PROVENANCE.md records for the fp32 model
    assert "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day," \
        in proc.stdout, proc.stdout
