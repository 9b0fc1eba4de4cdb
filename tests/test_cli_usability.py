"""The CLI people expect: --version, completion, -q / -v, --threads, labelled progress with ETA,
the total wall time, help without type artifacts and with the method table, one option name per
concept, did-you-mean, and inspect stating the source's quantization in words."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import qconvert
from qconvert.catalog import METHOD_TABLE, supported_architectures
from tests.conftest import REPO, SHARED, STORIES, make_hf_folder, need_shared
from tests.test_cli import assert_one_line_error, qconvert as cli

CALIB = SHARED / "data" / "tinyshakespeare" / "input.txt"


def run_env(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qconvert", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, **env})


@pytest.fixture
def tiny(tmp_path) -> Path:
    return make_hf_folder(tmp_path / "tiny")


def test_version():
    proc = cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"qconvert {qconvert.__version__}"


def test_shell_completion_completes_options():
    script = cli("--show-completion", "bash")
    assert script.returncode == 0 and "_QCONVERT_COMPLETE" in script.stdout
    proc = run_env(_QCONVERT_COMPLETE="complete_bash", COMP_WORDS="qconvert quantize --me", COMP_CWORD="2")
    assert proc.returncode == 0
    assert "--method" in proc.stdout.split()


def test_quiet_prints_nothing(tiny, tmp_path):
    # the tiny model makes notes (fallbacks) and a warning (no tokenizer): -q silences all of them
    proc = cli("quantize", tiny, "-b", "4", "-o", tmp_path / "m.q", "-q")
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
    assert (tmp_path / "m.q").exists()
    proc = cli("inspect", tmp_path / "m.q", "--verify", "-q")
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
    # errors are still said, in one line
    assert_one_line_error(cli("export", tmp_path / "m.q", "--to", "gguf", "-o", tmp_path / "x.gguf", "-q"), "tokenizer")


def test_quiet_even_on_a_terminal(tiny, tmp_path):
    proc = run_env("quantize", tiny, "-o", tmp_path / "m.q", "-q", TTY_COMPATIBLE="1")
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""


def test_verbose_lists_every_tensor_decision(tiny, tmp_path):
    proc = cli("quantize", tiny, "-b", "8", "-o", tmp_path / "m.q", "-v")
    assert proc.returncode == 0, proc.stderr
    with qconvert.load(tmp_path / "m.q") as c:
        for name, info in c.tensors.items():
            assert re.search(rf"{re.escape(name)}\s+\S+\s+F32 -> {info.block_type.name}", proc.stderr), name


def test_verbose_with_json_prints_only_the_json_and_quiet_with_verbose_is_an_error(tiny, tmp_path):
    proc = cli("quantize", tiny, "-o", tmp_path / "m.q", "--json", "-v")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tensors"] == 20
    assert_one_line_error(cli("quantize", tiny, "-o", tmp_path / "n.q", "-q", "-v"), "--quiet or --verbose, not both")
    assert not (tmp_path / "n.q").exists()


def test_threads_on_quantize_and_imatrix(tiny, tmp_path):
    proc = cli("quantize", tiny, "-o", tmp_path / "m.q", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert_one_line_error(cli("quantize", tiny, "-o", tmp_path / "n.q", "--threads", "0"), "--threads must be between 1 and")
    text = tmp_path / "t.txt"
    text.write_text("x " * 50)
    assert_one_line_error(cli("imatrix", tmp_path / "m.q", "--calib", text, "-o", tmp_path / "i.q", "-j", "0"),
                          "--threads must be between 1 and")
    assert not (tmp_path / "n.q").exists() and not (tmp_path / "i.q").exists()


@pytest.mark.shared
def test_each_phase_has_a_labelled_bar_with_count_and_eta(tmp_path):
    proc = run_env("quantize", need_shared(STORIES), "--method", "q4_k_m", "--calib", need_shared(CALIB), "--chunks", "2",
                   "-o", tmp_path / "m.q", TTY_COMPATIBLE="1", COLUMNS="200")
    assert proc.returncode == 0, proc.stderr
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", proc.stderr)
    # the importance matrix runs the calibration pipeline: its bar counts stories260K's 5 layers
    assert re.search(r"importance matrix\s.*\b5/5\b.*ETA", screen), screen[-2000:]
    assert re.search(r"quantizing\s.*\b47/47\b.*ETA", screen), screen[-2000:]
    assert "wrote" in proc.stdout


def test_reported_seconds_cover_the_importance_matrix(tiny, tmp_path, monkeypatch):
    """The importance matrix is computed before the tensors: its time belongs in the total."""
    import qconvert.convert as convert_module

    clock = [100.0]
    monkeypatch.setattr(convert_module.time, "perf_counter", lambda: clock[0])

    def slow_imatrix(*args, **kwargs):
        clock[0] += 385.0  # what a long importance matrix costs
        return {}, {"chunks": 1}

    monkeypatch.setattr(sys.modules["qconvert.imatrix"], "imatrix_for_source", slow_imatrix)
    text = tmp_path / "t.txt"
    text.write_text("x")
    result = qconvert.quantize(tiny, tmp_path / "m.q", method="q4_k_m", calib=text)
    assert result.seconds == 385.0


def _help(*args: str) -> str:
    proc = run_env(*args, "--help", COLUMNS="200")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("command", ["", "quantize", "inspect", "run", "imatrix", "export", "eval"])
def test_help_has_no_type_artifacts(command):
    text = _help(*([command] if command else []))
    artifacts = re.findall(r"<(?:bool|str|int|float|path|list\[\w+\])>", text)
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    artifacts += re.findall(r"\{[A-Za-z_]+\}", usage)  # typer's {ARG} for required arguments
    assert artifacts == [], artifacts


def test_quantize_help_has_the_method_table_and_main_help_the_architectures():
    text = _help("quantize")
    assert "bits/weight" in text and "mean KLD" in text
    for method, _types, size, kld in METHOD_TABLE:
        assert re.search(rf"{re.escape(method)}\s+[\d./]+\s+{re.escape(size)}\s+{re.escape(kld)}", text), method
    assert "--calib-chunks" not in text and "--chunks" in text
    main = _help()
    for arch in supported_architectures()["hf"] + supported_architectures()["gguf"]:
        assert arch in main
    assert "--version" in main and "--install-completion" in main


@pytest.mark.shared
def test_calib_chunks_is_a_deprecated_alias_of_chunks(tmp_path):
    src, calib = need_shared(STORIES), need_shared(CALIB)
    proc = cli("quantize", src, "--method", "q4_k_m", "--calib", calib, "--calib-chunks", "2", "-o", tmp_path / "a.q")
    assert proc.returncode == 0, proc.stderr
    assert "--calib-chunks is deprecated; use --chunks" in proc.stderr
    proc = cli("quantize", src, "--method", "q4_k_m", "--calib", calib, "--chunks", "2", "-o", tmp_path / "b.q")
    assert proc.returncode == 0, proc.stderr
    with qconvert.load(tmp_path / "a.q") as a, qconvert.load(tmp_path / "b.q") as b:
        assert a.recipe["imatrix"]["chunks"] == b.recipe["imatrix"]["chunks"] == 2
        assert all(bytes(a.raw(n)) == bytes(b.raw(n)) for n in a.tensors)
    assert_one_line_error(cli("quantize", src, "--method", "q4_k_m", "--calib", calib, "--chunks", "2",
                              "--calib-chunks", "3", "-o", tmp_path / "c.q"), "give --chunks only")


@pytest.mark.parametrize("typo,suggestion", [("q4km", "q4_k_m"), ("gtpq", "gptq"), ("Q4_KM", "q4_k_m"), ("bf61", "bf16")])
def test_unknown_method_suggests_the_closest(tiny, tmp_path, typo, suggestion):
    assert_one_line_error(cli("quantize", tiny, "-m", typo, "-o", tmp_path / "m.q"), rf"did you mean {suggestion}\?")
    assert not (tmp_path / "m.q").exists()


def test_method_names_are_case_insensitive(tiny, tmp_path):
    proc = cli("quantize", tiny, "-m", "F16", "-o", tmp_path / "m.q", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "F16" in json.loads(proc.stdout)["types"]


def test_inspect_states_the_source_quantization_in_words(tiny, tmp_path):
    assert cli("quantize", tiny, "-o", tmp_path / "m.q").returncode == 0
    proc = cli("inspect", tmp_path / "m.q")
    assert "source quantization: unquantized (float weights: 20 F32 tensors)" in proc.stdout
    info = json.loads(cli("inspect", tmp_path / "m.q", "--json").stdout)
    assert info["source_quantization"] == "unquantized (float weights: 20 F32 tensors)"


def test_inspect_states_a_gptq_source_in_words(tmp_path):
    from tests.test_import_prequantized import make_gptq

    make_gptq(tmp_path / "gptq", bits=4, group=32)
    assert cli("quantize", tmp_path / "gptq", "-o", tmp_path / "m.q").returncode == 0
    proc = cli("inspect", tmp_path / "m.q")
    assert "source quantization: already quantized: a GPTQ checkpoint, 4-bit weights in groups of 32" in proc.stdout


@pytest.mark.shared
def test_inspect_states_a_q4_1_gguf_source_in_words(tmp_path):
    from tests.conftest import SMOLLM_GGUF

    src = need_shared(SMOLLM_GGUF)
    assert cli("quantize", src, "--method", "rtn", "-b", "4", "--asym", "-o", tmp_path / "m.q").returncode == 0
    proc = cli("inspect", tmp_path / "m.q")
    assert "source quantization: already quantized (Q4_1): 210 Q4_1, 61 F32, 1 Q8_0 tensors" in proc.stdout
