"""Never lose data: outputs never replace an input or an existing file unasked, killed runs leave
no temporary files for long, a quantized source is not re-quantized silently, options the
method ignores are refused, and a model without a tokenizer is flagged when it is converted.

Every refusal is one line on stderr, exit 1, no traceback, nothing written, the source untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qconvert
from qconvert.errors import QConvertError
from tests.conftest import REPO, SMOLLM_GGUF, STORIES, make_hf_folder, need_shared
from tests.test_cli import assert_one_line_error, qconvert as cli


def digest(path: Path) -> str:
    """sha256 of a file, or of every file in a folder (name and bytes)."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


@pytest.fixture
def tiny(tmp_path) -> Path:
    return make_hf_folder(tmp_path / "tiny")


# --- A1: outputs ---------------------------------------------------------------------------


def test_output_equal_to_a_gguf_source_is_refused(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    before = digest(src)
    assert_one_line_error(cli("quantize", src, "-o", src), r"is the input .*itself")
    assert_one_line_error(cli("quantize", src, "-o", src, "--force"), r"is the input .*itself")
    assert digest(src) == before and temps(tmp_path) == []


@pytest.mark.shared
def test_output_equal_to_the_real_gguf_is_refused_even_for_f32(tmp_path):
    src = need_shared(SMOLLM_GGUF)
    stat = src.stat()
    assert_one_line_error(cli("quantize", src, "-o", src, "--method", "f32", "--force"), r"is the input .*itself")
    assert (src.stat().st_size, src.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    with pytest.raises(QConvertError, match="itself"):
        qconvert.quantize(src, src, method="f32")


def test_output_inside_the_source_folder_is_refused(tiny, tmp_path):
    before = digest(tiny)
    for name in ("model.safetensors", "config.json"):
        assert_one_line_error(cli("quantize", tiny, "-o", tiny / name, "--force"), "a file of the input folder")
    assert digest(tiny) == before and temps(tiny) == []


def test_export_onto_its_own_container_is_refused(tiny, tmp_path):
    out = tmp_path / "m.q8"
    assert cli("quantize", tiny, "-o", out).returncode == 0
    before = digest(out)
    assert_one_line_error(cli("export", out, "--to", "gguf", "-o", out, "--force"), r"is the input .*itself")
    assert digest(out) == before
    with pytest.raises(QConvertError, match="itself"):
        qconvert.export(out, out)
    assert digest(out) == before


def test_existing_output_needs_force(tiny, tmp_path):
    out = tmp_path / "m.q"
    assert cli("quantize", tiny, "-b", "8", "-o", out).returncode == 0
    q8 = digest(out)
    assert_one_line_error(cli("quantize", tiny, "-b", "4", "-o", out), "already exists; pass --force")
    assert digest(out) == q8
    proc = cli("quantize", tiny, "-b", "4", "-o", out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert digest(out) != q8
    with qconvert.load(out) as c:
        assert c.recipe["bits"] == 4


def test_existing_export_and_imatrix_outputs_need_force(tiny, tmp_path):
    out = tmp_path / "m.q"
    assert cli("quantize", tiny, "-o", out).returncode == 0
    existing = tmp_path / "taken.gguf"
    existing.write_bytes(b"keep me")
    assert_one_line_error(cli("export", out, "--to", "gguf", "-o", existing), "already exists; pass --force")
    text = tmp_path / "calib.txt"
    text.write_text("hello " * 100)
    assert_one_line_error(cli("imatrix", out, "--calib", text, "-o", existing), "already exists; pass --force")
    assert existing.read_bytes() == b"keep me"


def test_output_that_is_a_directory_is_one_line_and_leaves_no_temp_file(tiny, tmp_path):
    target = tmp_path / "outdir"
    target.mkdir()
    for args in (("quantize", tiny, "-o", target), ("quantize", tiny, "-o", target, "--force")):
        assert_one_line_error(cli(*args), "is a directory")
    assert list(target.iterdir()) == [] and temps(tmp_path) == []
    with pytest.raises(QConvertError, match="is a directory"):
        qconvert.quantize(tiny, target)


# --- A2: temporary files of killed runs ----------------------------------------------------


def test_stale_temp_files_of_dead_processes_are_removed(tiny, tmp_path):
    dead = tmp_path / ".m.q.tmp-999999999"  # no process has this id (above any pid_max)
    alive = tmp_path / f".m.q.tmp-{os.getpid()}"  # this test's own process: still running
    other = tmp_path / ".other.q.tmp-999999999"  # belongs to another output: not ours to judge
    for p in (dead, alive, other):
        p.write_bytes(b"x" * 1000)
    proc = cli("quantize", tiny, "-o", tmp_path / "m.q")
    assert proc.returncode == 0, proc.stderr
    assert not dead.exists()
    assert alive.exists() and other.exists()


def _start_slow_quantize(out: Path) -> subprocess.Popen:
    """A run that spends a minute writing: SmolLM2's 210 matrices through the Q4_K_M search."""
    return subprocess.Popen(
        [sys.executable, "-m", "qconvert", "quantize", str(SMOLLM_GGUF), "--method", "q4_k_m", "--allow-requantize",
         "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )


def _wait_for_output_file(proc: subprocess.Popen, out: Path) -> None:
    """Until the run holds its output open: an unnamed file in the output's folder (O_TMPFILE,
    qconvert/atomicfile.py) or, where the system lacks it, the hidden ``.NAME.tmp-PID``."""
    folder = str(out.parent)
    for _ in range(1200):
        if proc.poll() is not None:
            break
        try:
            links = [os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")]
        except OSError:
            links = []
        if any(link.startswith(folder) and ("(deleted)" in link or ".tmp-" in link) for link in links):
            return
        time.sleep(0.1)
    raise AssertionError(f"the run never started writing (exit {proc.poll()})")


@pytest.mark.shared
@pytest.mark.slow
def test_sigkill_leaves_no_output_and_no_litter(tmp_path, tiny):
    need_shared(SMOLLM_GGUF)
    out = tmp_path / "m.q"
    proc = _start_slow_quantize(out)
    _wait_for_output_file(proc, out)
    proc.kill()
    proc.communicate()
    assert temps(tmp_path) == [] and not out.exists()  # the half-written file had no name
    done = cli("quantize", tiny, "-o", out)
    assert done.returncode == 0, done.stderr
    assert temps(tmp_path) == [] and out.exists()


@pytest.mark.shared
@pytest.mark.slow
def test_sigterm_stops_cleanly_without_output_or_temp_file(tmp_path):
    need_shared(SMOLLM_GGUF)
    out = tmp_path / "m.q"
    proc = _start_slow_quantize(out)
    _wait_for_output_file(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "terminated; no output was written" in stderr and "Traceback" not in stderr
    assert temps(tmp_path) == [] and not out.exists()


# --- A3: re-quantizing a quantized source --------------------------------------------------


@pytest.mark.shared
def test_quantized_gguf_is_not_requantized_without_the_flag(tmp_path):
    src = need_shared(SMOLLM_GGUF)
    out = tmp_path / "m.q"
    proc = cli("quantize", src, "--method", "q4_k_m", "-o", out)
    assert_one_line_error(proc, r"already quantized \(Q4_1\).*--allow-requantize")
    assert not out.exists() and temps(tmp_path) == []
    with pytest.raises(QConvertError, match="--allow-requantize"):
        qconvert.quantize(src, out, method="rtn", bits=4)
    # dequantizing into a float reference is what f32/f16/bf16 are for: no flag needed
    proc = cli("quantize", src, "--method", "f16", "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["types"] == {"F16": 211, "F32": 61}


def test_gptq_checkpoint_is_not_requantized_without_the_flag(tmp_path):
    from tests.test_import_prequantized import make_gptq

    make_gptq(tmp_path / "gptq")
    out = tmp_path / "m.q"
    assert_one_line_error(cli("quantize", tmp_path / "gptq", "-b", "8", "-o", out),
                          r"already quantized: a GPTQ checkpoint.*--allow-requantize")
    assert not out.exists()
    proc = cli("quantize", tmp_path / "gptq", "-b", "8", "--allow-requantize", "-o", out)
    assert proc.returncode == 0, proc.stderr
    proc = cli("quantize", tmp_path / "gptq", "-o", tmp_path / "imported.q")  # the default imports it as it is
    assert proc.returncode == 0, proc.stderr


# --- A4: options the method ignores --------------------------------------------------------


@pytest.mark.parametrize("args,pattern", [
    (("--method", "nf4", "--bits", "4"), r"--method nf4 ignores --bits"),
    (("--method", "nf4", "--asym"), r"--method nf4 ignores --asym"),
    (("--method", "q4_k_m", "--bits", "4"), r"--method q4_k_m ignores --bits"),
    (("--method", "q6_k", "--group", "64"), r"--method q6_k ignores --group"),
    (("--method", "f16", "--bits", "8"), r"--method f16 ignores --bits"),
    (("--method", "bf16", "--asym"), r"--method bf16 ignores --asym"),
    (("--method", "rtn", "--act-order"), r"--method rtn ignores --act-order \(used by gptq\)"),
    (("--method", "rtn", "--damp", "0.1"), r"--method rtn ignores --damp"),
    (("--method", "rtn", "--calib-samples", "8"), r"--method rtn ignores --calib-samples"),
    (("--method", "awq", "--act-order", "--damp", "0.1"), r"--method awq ignores --act-order .* and --damp"),
    (("--method", "rtn", "--observer", "mse"), r"--method rtn ignores --observer \(used by w8a8\)"),
    (("--method", "rtn", "--no-double-quant"), r"--method rtn ignores --no-double-quant \(used by nf4\)"),
])
def test_options_the_method_ignores_are_refused(tiny, tmp_path, args, pattern):
    out = tmp_path / "m.q"
    assert_one_line_error(cli("quantize", tiny, "-o", out, *args), pattern)
    assert not out.exists()


def test_options_the_method_reads_are_accepted(tiny, tmp_path):
    proc = cli("quantize", tiny, "-o", tmp_path / "a.q", "--method", "rtn", "--bits", "4", "--asym", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["types"]["Q4_1"] == 14
    proc = cli("quantize", tiny, "-o", tmp_path / "b.q", "--method", "nf4", "--no-double-quant", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "NF4" in json.loads(proc.stdout)["types"]


# --- A5: no tokenizer ----------------------------------------------------------------------


def test_model_without_tokenizer_warns_at_quantize(tiny, tmp_path):
    proc = cli("quantize", tiny, "-o", tmp_path / "m.q")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "has no tokenizer" in warnings[0] and "qconvert run" in warnings[0]
    summary = json.loads(cli("quantize", tiny, "-o", tmp_path / "j.q", "--json").stdout)
    assert len(summary["warnings"]) == 1 and "no tokenizer" in summary["warnings"][0]
    assert qconvert.quantize(tiny, tmp_path / "api.q").warnings == summary["warnings"]


@pytest.mark.shared
def test_model_with_tokenizer_does_not_warn(tmp_path):
    proc = cli("quantize", need_shared(STORIES), "-o", tmp_path / "s.q")
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr
