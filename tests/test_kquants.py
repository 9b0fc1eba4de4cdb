"""K-quants (Q2_K ... Q6_K, Q8_K) and the importance-matrix paths of Q4_0/Q4_1/Q5_0/Q5_1.

- decoding equals gguf-py's ``gguf.quants.dequantize`` bit for bit, on random bytes and on
  bytes we write (synthetic rows and SmolLM2's real ffn_down rows);
- the numba kernels equal the plain-Python reference (``kquants_reference``, a line-by-line
  port of ggml-quants.c) byte for byte, with and without an importance vector;
- quantization errors are ordered and bounded sensibly, and an importance vector lowers the
  importance-weighted error;
- optional tier: byte identity with llama.cpp's own C quantizers (``ggml_quantize_chunk``, the
  function ``llama_model_quantize`` calls per tensor), when llama-cpp-python is installed (its
  bundled libggml-base) or ``QCONVERT_GGML_BASE_LIB`` names a libggml-base shared library.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest

from qconvert.blocks import by_name, kquants, kquants_reference
from qconvert.errors import QConvertError

K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
LEGACY_IMATRIX = ["Q4_0", "Q4_1", "Q5_0", "Q5_1"]
SMOLLM_GGUF = (
    Path(__file__).resolve().parents[1].parent
    / "shared" / "models" / "smollm2-135m-instruct-q4_1-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
)  # fmt: skip
# byte offsets of the f16 fields of each type (random bytes get finite values there)
F16_FIELDS = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def _gguf():
    return pytest.importorskip("gguf", reason="gguf-py (the `gguf` package) is not installed")


def _corner_rows() -> np.ndarray:
    """2 rows x 1280: ten super-blocks, each a different corner of the searches."""
    rng = np.random.default_rng(11)
    g = lambda: rng.standard_normal(256).astype(np.float32)  # noqa: E731
    outl = g()
    outl[rng.random(256) < 0.03] *= 50
    half_zero = g()
    half_zero[::32] = 0
    half_zero[:48] = 0  # whole 16- and 32-element groups of zeros
    ints = (rng.integers(-8, 8, 256) / 2).astype(np.float32)  # many exact ties
    blocks = [
        g(), outl, np.zeros(256, np.float32), half_zero, np.abs(g()) + 0.5,
        -np.abs(g()), np.full(256, -0.7, np.float32), g() * np.float32(1e-6), g() * np.float32(1e4), ints,
    ]  # fmt: skip
    return np.concatenate(blocks).reshape(2, 1280)


def _skewed_importance(n: int, seed: int = 3) -> np.ndarray:
    """Log-normal importance with some zeros and a few spikes (like a real imatrix)."""
    rng = np.random.default_rng(seed)
    imp = np.exp(2.0 * rng.standard_normal(n)).astype(np.float32)
    imp[rng.random(n) < 0.05] = 0
    imp[rng.integers(0, n, 4)] *= 1000
    return imp


def _ffn_down(n_rows: int | None = None) -> np.ndarray:
    if not SMOLLM_GGUF.exists():
        pytest.skip(f"needs {SMOLLM_GGUF} (the shared/ folder beside the repo with real models); absent here")
    from qconvert.sources.gguf import open_gguf

    with open_gguf(SMOLLM_GGUF) as src:
        t = next(t for t in src.tensors if t.name == "model.layers.0.mlp.down_proj.weight")
        w = t.load()
    assert w.shape[-1] == 1536
    return w if n_rows is None else w[:n_rows]


def _assert_same_floats(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.array_equal(a.astype(np.float32).view(np.uint32), b.astype(np.float32).view(np.uint32))


# --- registry entries ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,type_id,type_size", [("Q2_K", 10, 84), ("Q3_K", 11, 110), ("Q4_K", 12, 144), ("Q5_K", 13, 176), ("Q6_K", 14, 210), ("Q8_K", 15, 292)]
)
def test_registry_entries(name, type_id, type_size):
    gguf = _gguf()
    bt = by_name(name)
    assert (bt.id, bt.block_size, bt.type_size, bt.ggml) == (type_id, 256, type_size, True)
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)] == (256, type_size)


@pytest.mark.parametrize("name", K_TYPES + ["Q8_K"])
def test_rows_not_multiple_of_256_raise(name):
    bt = by_name(name)
    assert not bt.can_hold((4, 576)) and bt.can_hold((4, 1536))
    with pytest.raises(QConvertError):
        bt.quantize(np.zeros((2, 576), np.float32))
    with pytest.raises(QConvertError):
        kquants.quantize_k(bt.id, np.zeros((2, 300), np.float32))


@pytest.mark.parametrize("name", K_TYPES + LEGACY_IMATRIX)
def test_bad_importance_vectors_raise(name):
    bt = by_name(name)
    x = np.ones((2, 512), np.float32)
    with pytest.raises(QConvertError):
        bt.quantize(x, np.ones(256, np.float32))
    bad = np.ones(512, np.float32)
    bad[7] = np.nan
    with pytest.raises(QConvertError):
        bt.quantize(x, bad)


# --- decoding == gguf-py ------------------------------------------------------------------------


@pytest.mark.parametrize("name", K_TYPES)
def test_dequantize_random_bytes_matches_gguf(name):
    gguf = _gguf()
    from gguf import quants as gq

    bt = by_name(name)
    rng = np.random.default_rng(bt.id)
    n = 600
    raw = rng.integers(0, 256, (n, bt.type_size), dtype=np.uint8)
    for off in F16_FIELDS[name]:
        scale = rng.choice(np.array([1e-6, 1e-3, 1.0, 300.0]), n)
        vals = (rng.standard_normal(n) * scale).astype(np.float16)
        vals[::50] = 0
        raw[:, off : off + 2] = vals.view(np.uint8).reshape(n, 2)
    ours = bt.dequantize(raw, (n, 256))
    theirs = gq.dequantize(raw, gguf.GGMLQuantizationType(bt.id)).reshape(n, 256)
    _assert_same_floats(ours, theirs)


def test_q8_k_dequantize_and_layout():
    bt = by_name("Q8_K")
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((3, 512)) * [[1.0], [1e-3], [0.0]]).astype(np.float32)
    raw = bt.quantize(x).reshape(-1, 292)
    d = raw[:, 0:4].copy().view("<f4")
    q = raw[:, 4:260].view(np.int8)
    bsums = raw[:, 260:292].copy().view("<i2")
    assert np.array_equal(bsums, q.reshape(-1, 16, 16).astype(np.int32).sum(-1))
    _assert_same_floats(bt.dequantize(raw, (raw.shape[0], 256)), d * q.astype(np.float32))
    assert np.abs(q).max() == 127 and not raw[-2:].any()  # the all-zero row is all zero bytes
    assert np.array_equal(raw.reshape(3, -1), kquants_reference.quantize_k(15, x))


@pytest.mark.parametrize("name", K_TYPES)
def test_dequantize_our_bytes_matches_gguf(name):
    gguf = _gguf()
    from gguf import quants as gq

    bt = by_name(name)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((8, 4096)).astype(np.float32)
    x[1] *= 1e-4
    x[2, ::7] *= 40
    for rows in (x, _corner_rows()):
        for imp in (None, _skewed_importance(rows.shape[1])):
            raw = bt.quantize(rows, imp)
            theirs = gq.dequantize(raw, gguf.GGMLQuantizationType(bt.id)).reshape(rows.shape)
            _assert_same_floats(bt.dequantize(raw, rows.shape), theirs)


@pytest.mark.shared
@pytest.mark.parametrize("name", K_TYPES)
def test_real_ffn_down_rows(name):
    """SmolLM2's 1536-wide ffn_down: gguf-py decodes our bytes to our values, the error is in
    line with the type, and the numba kernels equal the reference on a real row."""
    gguf = _gguf()
    from gguf import quants as gq

    bt = by_name(name)
    w = _ffn_down()
    raw = bt.quantize(w)
    deq = bt.dequantize(raw, w.shape)
    _assert_same_floats(deq, gq.dequantize(raw, gguf.GGMLQuantizationType(bt.id)).reshape(w.shape))
    rel = np.sqrt(np.mean((deq - w) ** 2) / np.mean(w**2))
    assert rel < {"Q2_K": 0.5, "Q3_K": 0.25, "Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03}[name]
    imp = _skewed_importance(w.shape[1])
    for importance in (None, imp):
        assert np.array_equal(
            kquants.quantize_k(bt.id, w[:1], importance), kquants_reference.quantize_k(bt.id, w[:1], importance)
        )


# --- numba == reference ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", K_TYPES + ["Q8_K"])
def test_numba_equals_reference_without_importance(name):
    x = _corner_rows()
    bt = by_name(name)
    assert np.array_equal(bt.quantize(x), kquants_reference.quantize_k(bt.id, x))


@pytest.mark.parametrize("name", K_TYPES)
def test_numba_equals_reference_with_importance(name):
    x = _corner_rows()
    bt = by_name(name)
    imp = _skewed_importance(x.shape[1])
    imp[256:512] = 0  # a whole super-block without importance
    assert np.array_equal(bt.quantize(x, imp), kquants_reference.quantize_k(bt.id, x, imp))


@pytest.mark.parametrize("name", LEGACY_IMATRIX)
def test_legacy_importance_numba_equals_reference(name):
    bt = by_name(name)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 96)).astype(np.float32)
    x[1] = 0
    x[2, :32] = 0
    x[3] *= 1000
    x[4, 40:] = np.abs(x[4, 40:])
    imp = _skewed_importance(96)
    got = bt.quantize(x, imp)
    assert np.array_equal(got, kquants_reference.quantize_legacy_imatrix(bt.id, x, imp))
    wide = _corner_rows()
    imp = _skewed_importance(wide.shape[1])
    assert np.array_equal(bt.quantize(wide, imp), kquants_reference.quantize_legacy_imatrix(bt.id, wide, imp))


@pytest.mark.parametrize("name", LEGACY_IMATRIX + ["Q8_0"])
def test_legacy_without_importance_is_the_reference_quantizer(name):
    bt = by_name(name)
    x = _corner_rows()
    assert np.array_equal(bt.quantize(x), bt.quantize_blocks(x.reshape(-1, 32)).reshape(x.shape[0], -1))
    if name == "Q8_0":  # llama.cpp ignores the imatrix for Q8_0
        assert np.array_equal(bt.quantize(x, _skewed_importance(x.shape[1])), bt.quantize(x))


@pytest.mark.parametrize("name", K_TYPES)
def test_blocks_are_independent_without_importance(name):
    """Without importance a super-block's bytes depend on it alone (quantize_blocks == rows)."""
    bt = by_name(name)
    x = _corner_rows()
    assert np.array_equal(bt.quantize(x).reshape(-1, bt.type_size), bt.quantize_blocks(x.reshape(-1, 256)))
    assert np.array_equal(bt.quantize(x[:, 256:512]), bt.quantize(x)[:, bt.type_size : 2 * bt.type_size])


@pytest.mark.parametrize("name", K_TYPES + LEGACY_IMATRIX)
def test_importance_applies_per_column(name):
    """Every row of a matrix uses the same importance vector, column by column."""
    bt = by_name(name)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 1024)).astype(np.float32)
    imp = _skewed_importance(1024)
    whole = bt.quantize(x, imp)
    for r in range(3):
        assert np.array_equal(whole[r], bt.quantize(x[r : r + 1], imp)[0])


# --- error behaviour -----------------------------------------------------------------------------


def test_error_ordering_on_gaussian_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 4096)).astype(np.float32)
    rmse = {}
    for name in K_TYPES + ["Q8_K"]:
        bt = by_name(name)
        rmse[name] = float(np.sqrt(np.mean((bt.dequantize(bt.quantize(x), x.shape) - x) ** 2)))
    assert rmse["Q2_K"] > rmse["Q3_K"] > rmse["Q4_K"] > rmse["Q5_K"] > rmse["Q6_K"] > rmse["Q8_K"]
    # unit-variance data: each extra bit roughly halves the error
    bounds = {"Q2_K": (0.2, 0.4), "Q3_K": (0.1, 0.2), "Q4_K": (0.05, 0.09), "Q5_K": (0.025, 0.045), "Q6_K": (0.012, 0.023)}
    for name, (lo, hi) in bounds.items():
        assert lo < rmse[name] < hi, (name, rmse[name])
    # Q4_K spends 4.5 bits like Q4_0 and beats it
    q40 = by_name("Q4_0")
    assert rmse["Q4_K"] < np.sqrt(np.mean((q40.dequantize(q40.quantize(x), x.shape) - x) ** 2))


@pytest.mark.parametrize("name", K_TYPES + LEGACY_IMATRIX)
def test_importance_lowers_weighted_error(name):
    bt = by_name(name)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 2048)).astype(np.float32)
    imp = np.exp(2.0 * rng.standard_normal(2048)).astype(np.float32)
    plain = bt.quantize(x)
    weighted = bt.quantize(x, imp)
    assert not np.array_equal(plain, weighted)

    def werr(raw):
        return float(np.sqrt(np.mean(imp * (bt.dequantize(raw, x.shape) - x) ** 2)))

    assert werr(weighted) < 0.9 * werr(plain)


def test_zero_and_constant_blocks():
    for name in K_TYPES + ["Q8_K"]:
        bt = by_name(name)
        zeros = np.zeros((1, 512), np.float32)
        assert np.array_equal(bt.dequantize(bt.quantize(zeros), zeros.shape), zeros), name
        const = np.full((1, 256), -0.75, np.float32)
        err = np.abs(bt.dequantize(bt.quantize(const), const.shape) - const).max()
        assert err < 0.02, (name, err)


# --- optional: llama.cpp's own C quantizers --------------------------------------------------------

GGML_LIB_ENV = "QCONVERT_GGML_BASE_LIB"


def _ggml_quantize_chunk():
    path = os.environ.get(GGML_LIB_ENV)
    if not path:
        try:
            import llama_cpp  # noqa: F401  (llama-cpp-python bundles libggml-base)
        except ImportError:
            pytest.skip(
                "llama.cpp reference tier: llama_cpp (llama-cpp-python) is not installed and "
                f"{GGML_LIB_ENV} does not name a libggml-base shared library"
            )
        lib_dir = Path(llama_cpp.__file__).resolve().parent / "lib"
        found = sorted(lib_dir.glob("*ggml-base*"))
        if not found:
            pytest.skip(f"llama_cpp is installed but {lib_dir} holds no libggml-base library")
        path = str(found[0])
    lib = ctypes.CDLL(path)
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def quantize(type_id: int, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
        rows = np.ascontiguousarray(rows, np.float32)
        bt = by_name({2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0"}.get(type_id) or ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"][type_id - 10])
        out = np.zeros((rows.shape[0], bt.row_bytes(rows.shape[1])), np.uint8)
        imp = None if importance is None else np.ascontiguousarray(importance, np.float32)
        n = fn(type_id, rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None if imp is None else imp.ctypes.data)
        assert n == out.nbytes
        return out

    return quantize


@pytest.fixture(scope="module")
def ggml_quantize():
    return _ggml_quantize_chunk()


@pytest.mark.parametrize("name", K_TYPES + LEGACY_IMATRIX + ["Q8_0"])
def test_llama_cpp_reference_synthetic(ggml_quantize, name):
    """Byte identity with llama.cpp on synthetic rows (4096 wide) and the corner rows.

    llama.cpp's quantizers live in ggml-base, which its build compiles without -march flags,
    so no FMA contraction; a library built with e.g. CMAKE_C_FLAGS=-march=native may contract
    float expressions into FMAs and then differs in rare last-bit cases."""
    bt = by_name(name)
    rng = np.random.default_rng(21)
    x = rng.standard_normal((16, 4096)).astype(np.float32)
    x[3] *= 1e-3
    x[5, rng.random(4096) < 0.02] *= 60
    for rows in (x, _corner_rows()):
        for imp in (None, _skewed_importance(rows.shape[1])):
            assert np.array_equal(bt.quantize(rows, imp), ggml_quantize(bt.id, rows, imp)), (name, imp is not None)


@pytest.mark.shared
@pytest.mark.parametrize("name", K_TYPES + LEGACY_IMATRIX)
def test_llama_cpp_reference_real_tensor(ggml_quantize, name):
    """All 576 rows of SmolLM2's layer-0 ffn_down, with and without an importance vector."""
    bt = by_name(name)
    w = _ffn_down()
    imp = (np.mean(w.astype(np.float64) ** 2, axis=0) * 1e4 + _skewed_importance(w.shape[1])).astype(np.float32)
    for importance in (None, imp):
        assert np.array_equal(bt.quantize(w, importance), ggml_quantize(bt.id, w, importance))


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama.cpp end-to-end tier: llama_cpp (llama-cpp-python) is not installed")
    return llama_cpp


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize(
    "name,ftype,with_imatrix",
    [("Q2_K", 10, True), ("Q4_K", 15, False), ("Q5_K", 17, True), ("Q6_K", 18, False)],
)
def test_llama_model_quantize_end_to_end(tmp_path, name, ftype, with_imatrix):
    """What llama-quantize writes: SmolLM2 (Q4_1, re-quantized via F32) through
    ``llama_model_quantize`` with ``pure`` (no per-tensor mixes; the 576-wide tensors fall back
    to a legacy type, llama.cpp's own rule) and optionally an importance matrix; every
    quantized tensor of the output must equal our bytes for the same rows."""
    llama_cpp = _llama_cpp()
    gguf = _gguf()
    if not SMOLLM_GGUF.exists():
        pytest.skip(f"needs {SMOLLM_GGUF} (the shared/ folder beside the repo with real models); absent here")
    from qconvert.blocks import by_id

    src = {t.name: t for t in gguf.GGUFReader(SMOLLM_GGUF).tensors}
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = 2
    params.ftype = ftype
    params.pure = True
    params.allow_requantize = True
    imatrix: dict[str, np.ndarray] = {}
    keep = []
    if with_imatrix:
        mats = [(n, t) for n, t in src.items() if len(t.shape) == 2]
        entries = (llama_cpp.llama_model_imatrix_data * (len(mats) + 1))()
        for k, (n, t) in enumerate(mats):
            v = _skewed_importance(int(t.shape[0]), seed=k)
            imatrix[n] = v
            keep += [v, n.encode()]
            entries[k].name = keep[-1]
            entries[k].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[k].size = v.size
        entries[len(mats)].name = None
        params.imatrix = ctypes.cast(entries, type(params.imatrix))
    out = tmp_path / f"{name}.gguf"
    assert llama_cpp.llama_model_quantize(str(SMOLLM_GGUF).encode(), str(out).encode(), ctypes.byref(params)) == 0
    compared = {}
    for t in gguf.GGUFReader(out).tensors:
        if t.tensor_type.name in ("F32", "F16"):
            continue
        bt = by_id(int(t.tensor_type.value))
        s = src[t.name]
        rows, n = int(np.prod(s.shape[1:])), int(s.shape[0])  # GGUF lists the row length first
        x = by_id(int(s.tensor_type.value)).dequantize(np.asarray(s.data).reshape(-1), (rows, n))
        theirs = np.asarray(t.data).reshape(rows, -1)
        assert np.array_equal(bt.quantize(x, imatrix.get(t.name)), theirs), (t.name, bt.name)
        compared[bt.name] = compared.get(bt.name, 0) + 1
    assert compared.get(name) == 30, compared  # the 30 ffn_down tensors (1536 wide)
