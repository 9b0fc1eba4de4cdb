"""Every script in examples/ runs, offline, on the small models in ../shared (skipped with a
reason when it is absent), and the CI workflow is a workflow whose work is examples/ci/gate.sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED, STORIES, need_shared

EXAMPLES = REPO / "examples"
SCRIPTS = sorted((EXAMPLES / "shell").glob("*.sh")) + sorted((EXAMPLES / "python").glob("*.py"))
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
CALIB = SHARED / "data" / "tinyshakespeare" / "input.txt"


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """The examples' variables pointed at ../shared, and a `qconvert` command that runs this tree."""
    for path in (STORIES, WIKI, CALIB):
        need_shared(path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "qconvert"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m qconvert "$@"\n')
    shim.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "HF_HUB_OFFLINE": "1",
        "MODEL": str(STORIES),
        "TEXT": str(WIKI),
        "CALIB": str(CALIB),
        "CHUNKS": "2",
        "WORK": str(tmp_path / "work"),
    }


def run_example(script: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = ["bash", str(script)] if script.suffix == ".sh" else [sys.executable, str(script)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(env["WORK"]).parent, timeout=600)


def test_every_flow_has_a_shell_and_a_python_example():
    shell = {p.stem for p in (EXAMPLES / "shell").glob("*.sh")}
    python = {p.stem for p in (EXAMPLES / "python").glob("*.py")}
    assert shell == python and {"quantize", "generate", "quality_gate", "imatrix", "export_gguf"} <= shell


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_runs(script, env):
    proc = run_example(script, env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    work = Path(env["WORK"])
    expected = {"quantize": ["model.q8", "model.q4_k_m"], "generate": ["model.q8"],
                "quality_gate": ["model.f32", "model.q4_k_m"], "imatrix": ["imatrix.gguf", "model.q4_k_m"],
                "export_gguf": ["model.Q4_K_M.gguf"]}[script.stem]
    for name in expected:
        assert (work / name).is_file(), name
    if script.stem == "export_gguf":
        assert (work / "model.Q4_K_M.gguf").read_bytes()[:4] == b"GGUF"
    if script.stem == "quality_gate":
        assert "quality gate passed" in proc.stdout


@pytest.mark.shared
def test_quality_gate_example_fails_with_exit_3_when_the_model_is_too_far(env):
    proc = run_example(EXAMPLES / "shell" / "quality_gate.sh", {**env, "MAX_KLD": "0", "METHOD": "q2_k"})
    assert proc.returncode == 3, proc.stderr
    assert "quality gate failed" in proc.stderr


@pytest.mark.shared
def test_ci_gate_publishes_a_gguf_only_when_the_gate_passes(env):
    gate = EXAMPLES / "ci" / "gate.sh"
    work = Path(env["WORK"])
    proc = run_example(gate, env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    gguf = work / "stories260K.Q4_K_M.gguf"
    assert proc.stdout.strip().splitlines()[-1] == str(gguf)
    assert gguf.read_bytes()[:4] == b"GGUF" and not (work / "stories260K.f32").exists()
    report = json.loads((work / "eval.json").read_text())
    assert report["gate"]["passed"] and report["reference"]["kld_mean"] <= 0.1  # the default MAX_KLD
    gguf.unlink()
    proc = run_example(gate, {**env, "MAX_KLD": "0"})
    assert proc.returncode == 3
    assert not gguf.exists()
    assert json.loads((work / "eval.json").read_text())["gate"]["passed"] is False


def test_ci_workflow_runs_the_gate_and_publishes_the_gguf():
    yaml = pytest.importorskip("yaml")
    wf = yaml.safe_load((EXAMPLES / "ci" / "quantize-gate-publish.yml").read_text())
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads the key `on` as True
    assert "workflow_dispatch" in on and on["push"]["tags"] == ["v*"]
    job = wf["jobs"]["convert"]
    runs = [s.get("run", "") for s in job["steps"]]
    assert "bash examples/ci/gate.sh" in runs
    gate_vars = {"MODEL", "METHOD", "MAX_KLD", "CHUNKS", "WORK"}
    assert gate_vars <= set(job["env"]) and any("TEXT=" in r for r in runs)
    uploads = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact")]
    assert uploads and "out/*.gguf" in uploads[0]["with"]["path"]
    assert any("gh release upload" in r for r in runs)
