"""The Python API mirrors the CLI: the same command through either gives the same result, and
results print as one short line."""

from __future__ import annotations

import json

import numpy as np
import pytest

import qconvert
from tests.conftest import SHARED, STORIES, make_hf_folder, need_shared
from tests.test_cli import qconvert as cli

WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
CALIB = SHARED / "data" / "tinyshakespeare" / "input.txt"


def test_every_command_has_a_function():
    for name in ("quantize", "inspect", "generate", "run", "evaluate", "export", "imatrix", "embed", "load"):
        assert callable(getattr(qconvert, name)), name
    assert qconvert.run is qconvert.generate


def test_submodules_that_share_a_name_with_a_function_still_import():
    from qconvert.evaluate import make_windows
    from qconvert.export.gguf import export_gguf
    from qconvert.imatrix import load_imatrix

    assert callable(make_windows) and callable(export_gguf) and callable(load_imatrix)
    assert callable(qconvert.imatrix) and not hasattr(qconvert.imatrix, "load_imatrix")


def test_quantize_and_inspect_match_the_cli(tmp_path):
    folder = make_hf_folder(tmp_path / "tiny")
    result = qconvert.quantize(folder, tmp_path / "api.q", bits=4)
    assert cli("quantize", folder, "-b", "4", "-o", tmp_path / "cli.q").returncode == 0
    assert (tmp_path / "api.q").read_bytes() == (tmp_path / "cli.q").read_bytes()
    text = repr(result)
    assert "\n" not in text and len(text) < 120 and "tensors=20" in text
    info = qconvert.inspect(tmp_path / "api.q")
    cli_info = json.loads(cli("inspect", tmp_path / "cli.q", "--json").stdout)
    assert info["tensors"] == cli_info["tensors"] and info["totals"] == cli_info["totals"]


@pytest.mark.shared
def test_generate_evaluate_export_imatrix_match_the_cli(tmp_path):
    src, wiki, calib = need_shared(STORIES), need_shared(WIKI), need_shared(CALIB)
    q8, f32 = tmp_path / "s.q8", tmp_path / "s.f32"
    qconvert.quantize(src, q8, bits=8)
    qconvert.quantize(src, f32, method="f32")

    pieces = []
    g = qconvert.generate(q8, "Once upon a time", max_tokens=20, on_text=pieces.append)
    ran = json.loads(cli("run", q8, "-p", "Once upon a time", "-n", "20", "--json").stdout)
    assert g.text == ran["text"] and g.ids == ran["ids"] and "".join(pieces) == g.text
    assert g.text.startswith(", there was a little girl")  # stories260K's usual continuation
    assert len(repr(g)) < 120 and "20 tokens" in repr(g)

    e = qconvert.evaluate(q8, wiki, reference=f32, ctx=128, chunks=2)
    ev = json.loads(cli("eval", q8, "--text", wiki, "--reference", f32, "--ctx", "128", "--chunks", "2", "--json").stdout)
    assert e.ppl == ev["ppl"] and e.reference["kld_mean"] == ev["reference"]["kld_mean"]
    assert repr(e).startswith(f"EvalResult(ppl={e.ppl:.4f}, kld_mean=") and "\n" not in repr(e)

    x = qconvert.export(q8, tmp_path / "api.gguf")
    assert cli("export", q8, "--to", "gguf", "-o", tmp_path / "cli.gguf").returncode == 0
    assert (tmp_path / "api.gguf").read_bytes() == (tmp_path / "cli.gguf").read_bytes()
    assert repr(x) == f"Export(output={str(tmp_path / 'api.gguf')!r}, format='gguf', bytes={x.summary['file_bytes']})"

    m = qconvert.imatrix(f32, calib, tmp_path / "api.gguf.imatrix.gguf", ctx=128, chunks=2)
    assert cli("imatrix", f32, "--calib", calib, "--ctx", "128", "--chunks", "2", "-o", tmp_path / "cli.gguf.imatrix.gguf").returncode == 0
    from qconvert.imatrix import load_imatrix

    back, _ = load_imatrix(tmp_path / "cli.gguf.imatrix.gguf")
    assert back.keys() == m.importance.keys()
    assert all(np.allclose(back[n], m.importance[n], rtol=1e-6) for n in back)
    assert repr(m).startswith(f"Imatrix({len(m.importance)} matrices, 256 tokens")
