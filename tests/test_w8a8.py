"""W8A8 (int8 weights x int8 activations, optional SmoothQuant): codec, integer kernel vs the
numpy reference, the exactness of the smoothing fold, and the method end to end on stories260K."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qconvert
from qconvert.blocks import by_name
from qconvert.errors import QConvertError
from qconvert.methods import w8a8 as method
from qconvert.runtime import kernels
from qconvert.runtime.kernels import reference_w8a8 as ref
from qconvert.runtime.kernels import w8a8 as kern

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
CALIB = SHARED / "data" / "tinyshakespeare" / "input.txt"
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
CAL = dict(calib=CALIB, calib_samples=8, calib_seqlen=128, seed=0)


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the shared/ folder beside the repo with real models and data); absent here")
    return path


def _matrix(seed: int, rows: int, cols: int) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    W = rng.normal(0, 0.05, (rows, cols)).astype(np.float32)
    W[1] = 0.0  # an all-zero row: scale 0
    W[2, 3] = 0.9  # an outlier
    return by_name("W8A8").quantize_with_params(W)


# ----------------------------------------------------------------------------- codec


def test_codec_rule_and_params_round_trip():
    bt = by_name("W8A8")
    assert (bt.id, bt.block_size, bt.type_size, bt.has_params) == (400, 1, 1, True)
    rng = np.random.default_rng(0)
    W = rng.normal(0, 1, (7, 45)).astype(np.float32)
    raw, params = bt.quantize_with_params(W)
    assert raw.shape == (7, 45) and raw.dtype == np.uint8 and params["act_scale"] is None
    # the params survive canonical JSON exactly (every scale reads back as the same float32)
    params = json.loads(json.dumps(params, sort_keys=True, separators=(",", ":")))
    d = (np.abs(W).max(axis=1) / np.float32(127)).astype(np.float32)
    assert np.array_equal(np.array(params["row_scales"], np.float64).astype(np.float32), d)
    q = raw.view(np.int8).astype(np.int64)
    assert np.array_equal(q, np.clip(np.rint(W * (np.float32(1) / d)[:, None]), -127, 127))
    assert q.min() >= -127 and np.all(np.abs(q).max(axis=1) == 127)
    deq = bt.dequantize(raw, W.shape, params)
    assert np.array_equal(deq, q.astype(np.float32) * d[:, None])
    assert np.all(np.abs(deq - W) <= d[:, None] / 2 * (1 + 1e-6))
    with pytest.raises(QConvertError, match="params"):
        bt.dequantize(raw, W.shape)
    with pytest.raises(QConvertError, match="row_scales"):
        bt.dequantize(raw, W.shape, {"row_scales": [1.0] * 6, "act_scale": None})
    with pytest.raises(QConvertError, match="act_scale"):
        kernels.prepare_aux("W8A8", {**params, "act_scale": 0.0}, W.shape)


# ----------------------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize("act_scale", [None, 0.004, 0.0005], ids=["dynamic", "static", "static-clipping"])
@pytest.mark.parametrize("T", [1, 2, 5, 33])
def test_kernel_matches_numpy_reference_bit_for_bit(act_scale, T):
    raw, params = _matrix(1, 40, 70)
    params = {**params, "act_scale": act_scale}
    aux = kernels.prepare_aux("W8A8", params, (40, 70))
    rng = np.random.default_rng(T)
    X = rng.normal(0, 0.2, (T, 70)).astype(np.float32)
    X[0, 5] = 3.0  # an activation outlier (clipped by the static scales)
    if T > 1:
        X[1] = 0.0  # an all-zero token: dynamic scale 0
    xq, a = kern.quantize_activations(X, aux)
    xq_ref, a_ref = ref.quantize_activations(X, aux.act_scale)
    assert np.array_equal(xq, xq_ref) and np.array_equal(a.view(np.uint32), a_ref.view(np.uint32))
    acc = kern.int_accumulate(raw, xq)
    assert acc.dtype == np.int32
    assert np.array_equal(acc, ref.int_accumulate(raw.view(np.int8), xq_ref))
    y = kernels.linear(raw, "W8A8", X, aux=aux)
    y_ref = ref.linear(raw, params, X)
    assert y.dtype == np.float32 and np.array_equal(y.view(np.uint32), y_ref.view(np.uint32))
    # one token through the matvec entry point: the same numbers
    assert np.array_equal(kernels.linear(raw, "W8A8", X[0], aux=aux), y_ref[0])
    # and the integer path means what W8A8 means: dequant(xq) @ dequant(W)^T
    np.testing.assert_allclose(y, ref.fake_quant_linear(raw, params, X), rtol=1e-5, atol=1e-6)


def test_integer_sums_are_exact_at_the_extremes():
    n = 4096
    raw = np.full((3, n), 127, np.int8)
    raw[1] = -127
    raw[2, ::2] = -127
    xq = np.full((2, n), -127, np.int8)
    acc = kern.int_accumulate(raw.view(np.uint8), xq)
    assert acc.tolist() == [[-127 * 127 * n, 127 * 127 * n, 0]] * 2
    assert kern.MAX_IN == (2**31 - 1) // (127 * 127)
    with pytest.raises(QConvertError, match="overflow"):
        kernels.prepare_aux("W8A8", {"row_scales": [1.0], "act_scale": None}, (1, kern.MAX_IN + 1))


def test_dequant_rows_equal_the_codec():
    raw, params = _matrix(2, 12, 33)
    aux = kernels.prepare_aux("W8A8", params, (12, 33))
    rows = kernels.embedding_rows(raw, "W8A8", [3, 0, 11], 33, aux=aux)
    assert np.array_equal(rows, by_name("W8A8").dequantize(raw, (12, 33), params)[[3, 0, 11]])


# ----------------------------------------------------------------------------- SmoothQuant


def test_smooth_scales_follow_the_reference_formula():
    act = np.array([4.0, 0.25, 0.0, 9.0])
    W1 = np.array([[1.0, -0.5, 0.0, 0.1], [0.2, 0.1, 0.0, -0.3]])
    W2 = np.array([[-2.0, 0.0, 0.0, 0.1]])
    s = method.smooth_scales(act, [W1, W2], 0.5)
    w = np.array([2.0, 0.5, 1e-5, 0.3])
    want = np.maximum(np.sqrt(act) / np.sqrt(w), 1e-5)
    np.testing.assert_allclose(s, want.astype(np.float32), rtol=1e-7)
    assert s.dtype == np.float32
    np.testing.assert_allclose(method.smooth_scales(act, [W1, W2], 1.0), np.maximum(act, 1e-5), rtol=1e-7)
    with pytest.raises(QConvertError, match="α"):
        method.smooth_scales(act, [W1], 1.5)


@pytest.fixture(scope="module")
def f32(tmp_path_factory) -> Path:
    need(STORIES)
    out = tmp_path_factory.mktemp("w8a8") / "f32.q"
    qconvert.quantize(STORIES, out, method="f32")
    return out


def _windows(c, n: int = 4, seqlen: int = 64):
    from qconvert.calibration import calibration_set
    from qconvert.runtime.tokenizer import Tokenizer

    return list(calibration_set(Tokenizer.from_container(c), need(CALIB), n, seqlen, 0).tokens)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def made(f32):
    need(CALIB)
    d = f32.parent
    qconvert.quantize(STORIES, d / "q8_0", method="rtn", bits=8)
    variants = {
        "minmax": dict(observer="minmax"),
        "entropy": dict(observer="entropy"),
        "percentile": dict(observer="percentile"),
        "mse": dict(observer="mse"),
        "entropy_sq": dict(observer="entropy", smooth=0.5),
        "dynamic": dict(act_mode="dynamic"),
        "dynamic_sq": dict(act_mode="dynamic", smooth=0.5),
    }
    for name, kw in variants.items():
        qconvert.quantize(STORIES, d / name, method="w8a8", **CAL, **kw)
    return d


def _kld(d: Path, name: str) -> float:
    from qconvert.evaluate import evaluate, read_text
    from qconvert.runtime.models import load_model
    from qconvert.runtime.tokenizer import Tokenizer

    with qconvert.load(d / "f32.q") as ref_c, qconvert.load(d / name) as c:
        tok = Tokenizer.from_container(c)
        tokens = tok.encode(read_text(need(WIKI))[:20000], add_bos=False)
        r = evaluate(load_model(c), tokens, ctx=128, chunks=6, bos_id=tok.bos_id, reference=load_model(ref_c))
    return r.reference["kld_mean"]


@pytest.mark.shared
def test_container_layout_and_recipe(made):
    with qconvert.load(made / "entropy_sq") as c:
        types = {n: t.block_type.name for n, t in c.tensors.items()}
        for i in range(c.config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                assert types[p + n + ".weight"] == "W8A8"
            assert types[p + "input_layernorm.weight"] == "F32"
        assert types["model.embed_tokens.weight"] == "Q8_0"  # the tied output projection: weight-only
        info = c.tensors["model.layers.0.mlp.down_proj.weight"]  # 172 columns: any row length fits
        assert info.shape == (64, 172) and len(info.extra["row_scales"]) == 64 and info.extra["act_scale"] > 0
        r = c.recipe
        assert (r["method"], r["observer"], r["smooth"], r["act_mode"], r["seed"]) == ("w8a8", "entropy", 0.5, "static", 0)
        assert r["calibration"]["samples"] == 8 and len(r["calibration"]["text_sha256"]) == 64
        # the smoothed norms were rewritten, the final norm was not
        with qconvert.load(made / "f32.q") as f:
            assert not np.allclose(c.tensor("model.layers.0.input_layernorm.weight"), f.tensor("model.layers.0.input_layernorm.weight"))
            assert np.array_equal(c.tensor("model.norm.weight"), f.tensor("model.norm.weight"))
    with qconvert.load(made / "dynamic") as c:
        assert c.tensors["model.layers.1.self_attn.q_proj.weight"].extra["act_scale"] is None
        assert c.recipe["observer"] is None and c.recipe["calibration"] is None and c.recipe["act_mode"] == "dynamic"


@pytest.mark.shared
def test_the_runtime_runs_the_integer_kernel(made):
    from qconvert.runtime.models import load_model

    with qconvert.load(made / "minmax") as c:
        name = "model.layers.2.mlp.up_proj.weight"
        lin = load_model(c).layers[2].linear("mlp.up_proj.weight")
        x = np.random.default_rng(0).normal(0, 1, (9, 64)).astype(np.float32)
        y = lin(x)
        assert np.array_equal(y, ref.linear(c.raw(name), c.tensors[name].extra, x))


@pytest.mark.shared
def test_kld_vs_f32_is_small_and_dynamic_is_at_least_as_good(made):
    kld = {n: _kld(made, n) for n in ("q8_0", "minmax", "entropy", "percentile", "mse", "entropy_sq", "dynamic", "dynamic_sq")}
    for n, v in kld.items():
        assert v < 0.05, kld
    assert kld["dynamic"] <= min(kld[n] for n in ("minmax", "entropy", "percentile", "mse")), kld
    assert kld["dynamic_sq"] <= kld["entropy_sq"], kld


@pytest.mark.shared
def test_each_observer_gives_its_own_scales(made):
    scales = {}
    for name in ("minmax", "entropy", "percentile", "mse"):
        with qconvert.load(made / name) as c:
            scales[name] = c.tensors["model.layers.0.mlp.down_proj.weight"].extra["act_scale"]
            assert c.recipe["observer"] == name
    # minmax covers everything; the others clip the tail (never above the observed max)
    assert all(scales[n] <= scales["minmax"] for n in scales), scales
    assert len(set(scales.values())) >= 3, scales


@pytest.mark.shared
def test_w8a8_is_deterministic(made, tmp_path):
    qconvert.quantize(STORIES, tmp_path / "again", method="w8a8", observer="entropy", smooth=0.5, **CAL)
    assert (tmp_path / "again").read_bytes() == (made / "entropy_sq").read_bytes()


@pytest.mark.shared
def test_bad_options_are_one_line_errors(f32, tmp_path):
    with pytest.raises(QConvertError, match="act-mode"):
        qconvert.quantize(STORIES, tmp_path / "x", method="w8a8", act_mode="sometimes", **CAL)
    with pytest.raises(QConvertError, match="observer"):
        qconvert.quantize(STORIES, tmp_path / "x", method="w8a8", observer="median", **CAL)
    with pytest.raises(QConvertError, match="smooth"):
        qconvert.quantize(STORIES, tmp_path / "x", method="w8a8", smooth=2.0, **CAL)
    with pytest.raises(QConvertError, match="8-bit"):
        qconvert.quantize(STORIES, tmp_path / "x", method="w8a8", bits=4, **CAL)


@pytest.mark.shared
def test_cli_w8a8(made, tmp_path):
    out = tmp_path / "cli.q"
    proc = subprocess.run(
        [sys.executable, "-m", "qconvert", "quantize", str(STORIES), "-o", str(out), "--method", "w8a8",
         "--calib", str(CALIB), "--calib-samples", "8", "--calib-seqlen", "128", "--observer", "entropy",
         "--smooth", "0.5", "--act-mode", "static"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "W8A8" in proc.stdout
    assert out.read_bytes() == (made / "entropy_sq").read_bytes()
