"""ONNX models in: weights found in initializers and Constant nodes, per-channel int8 / Q8_0 /
Q4_0, static activation calibration with each observer, `run`, and the QDQ export.

A tiny model built with onnx.helper (Conv, MatMul with a Constant-node weight, Gemm transB=1,
Gemm transB=0) keeps this fast; the real ddddocr detector in ../shared is tested when present.
Tests that need onnxruntime skip without it (the rest run on onnx's reference evaluator).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from qconvert import load  # noqa: E402
from qconvert.errors import QConvertError  # noqa: E402
from qconvert.onnx import export_qdq, onnx_summary, quantize_onnx, run_container  # noqa: E402
from qconvert.onnx.quant import q8_0_parts  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DETECTOR = SHARED / "models" / "onnx" / "ddddocr-det" / "common_det.onnx"
OBSERVERS = ("minmax", "percentile", "entropy", "mse")


def tiny_model(seed: int = 0, fp16: bool = False):
    rng = np.random.default_rng(seed)
    dt = np.float16 if fp16 else np.float32
    et = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT

    def w(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(dt)

    conv_w, conv_b = w(8, 3, 3, 3), w(8)  # rows of 27: padded to 32
    mm_w, mm_b = w(512, 64), w(64)  # MatMul (in, out), held by a Constant node
    g1_w, g1_b = w(40, 64), w(40)  # Gemm transB=1: (out, in)
    g2_w = w(40, 10)  # Gemm transB=0: (in, out), rows of 40: padded to 64
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["fl"], axis=1),
        helper.make_node("Constant", [], ["mm_w"], value=numpy_helper.from_array(mm_w, "mm_w_value")),
        helper.make_node("MatMul", ["fl", "mm_w"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "mm_b"], ["mb"]),
        helper.make_node("Sigmoid", ["mb"], ["s"]),
        helper.make_node("Mul", ["mb", "s"], ["h"]),
        helper.make_node("Gemm", ["h", "g1_w", "g1_b"], ["g1"], transB=1, name="gemm_tb"),
        helper.make_node("Relu", ["g1"], ["g1r"]),
        helper.make_node("Gemm", ["g1r", "g2_w"], ["y"], name="gemm"),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((conv_w, "conv_w"), (conv_b, "conv_b"), (mm_b, "mm_b"), (g1_w, "g1_w"), (g1_b, "g1_b"), (g2_w, "g2_w"))]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", et, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", et, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("onnx")
    onnx.save(tiny_model(), str(d / "tiny.onnx"))
    rng = np.random.default_rng(1)
    (d / "calib").mkdir()
    for i in range(3):
        np.save(d / "calib" / f"{i}.npy", rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    np.save(d / "calib" / "stack.npy", rng.standard_normal((2, 1, 3, 8, 8)).astype(np.float32))  # 2 samples
    np.save(d / "x.npy", rng.standard_normal((4, 3, 8, 8)).astype(np.float32))
    return d / "tiny.onnx"


def fp32(model_path: Path, x: np.ndarray) -> np.ndarray:
    return ReferenceEvaluator(str(model_path)).run(None, {"x": x})[0]


def ort_run(path: Path, x: np.ndarray, name: str = "x", qdq_transformers: bool = False) -> np.ndarray:
    ort = pytest.importorskip("onnxruntime")
    so = ort.SessionOptions()
    if not qdq_transformers:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {name: x})[0]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max() / np.abs(b.astype(np.float32)).max())


# --------------------------------------------------------------------------- the source


def test_weights_in_initializers_and_constant_nodes(tiny):
    from qconvert.sources import open_source

    src = open_source(str(tiny))
    refs = src.refs
    assert list(refs) == ["conv_w", "mm_w", "g1_w", "g2_w"]
    assert (refs["conv_w"].layout, refs["conv_w"].rows_shape) == ("conv", (8, 27))
    assert (refs["mm_w"].layout, refs["mm_w"].origin, refs["mm_w"].rows_shape) == ("in_out", "constant", (64, 512))
    assert (refs["g1_w"].layout, refs["g1_w"].rows_shape) == ("out_in", (40, 64))
    assert (refs["g2_w"].layout, refs["g2_w"].rows_shape) == ("in_out", (10, 40))
    # the source's rows are the weights in (out, in) orientation
    m = onnx.load(str(tiny))
    g2 = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "g2_w"))
    np.testing.assert_array_equal(next(t for t in src.tensors if t.name == "g2_w").load(), g2.T)
    # the stored graph: no Constant node, placeholders without data
    g = src.stripped.graph
    assert not [n for n in g.node if n.op_type == "Constant"]
    ph = {t.name: t for t in g.initializer if t.name in refs}
    assert set(ph) == set(refs) and all(not t.raw_data and t.data_location == t.EXTERNAL for t in ph.values())
    assert {c.activation for r in refs.values() for c in r.consumers} == {"x", "fl", "h", "g1r"}


def test_int8_per_channel_is_q8_0_with_one_scale_per_row(tiny, tmp_path):
    out = tmp_path / "t.q"
    r = quantize_onnx(tiny, out)
    assert {p.name: (p.type_name, p.shape) for p in r.plans} == {
        "conv_w": ("Q8_0", (8, 32)), "mm_w": ("Q8_0", (64, 512)), "g1_w": ("Q8_0", (40, 64)), "g2_w": ("Q8_0", (10, 64))}
    src = onnx.load(str(tiny))
    conv = numpy_helper.to_array(next(t for t in src.graph.initializer if t.name == "conv_w")).reshape(8, 27)
    with load(out) as c:
        assert c.architecture == "onnx" and c.recipe["mix"] == "onnx-int8" and c.recipe["group"] is None
        q, d = q8_0_parts(c.raw("conv_w"), 8)
        assert (d == d[:, :1]).all()  # every block of a row carries the row's scale
        assert (q[:, 27:] == 0).all()  # padding
        s = d[:, 0]
        assert (s * 127 >= np.abs(conv).max(axis=1)).all() and (s * 127 <= np.abs(conv).max(axis=1) * (1 + 2**-10)).all()
        np.testing.assert_array_equal(q[:, :27], np.clip(np.rint(conv / s[:, None]), -127, 127))
        np.testing.assert_array_equal(c.tensor("conv_w")[:, :27], q[:, :27] * s[:, None])
        entry = c.metadata["onnx.weights"]["g2_w"]
        assert entry["shape"] == [40, 10] and entry["layout"] == "in_out" and entry["row_length"] == 40
        assert entry["scheme"] == "int8" and entry["consumers"] == [{"node": 9, "op": "Gemm", "name": "gemm"}]
        assert c.metadata["onnx.weights"]["mm_w"]["origin"] == "constant"
        info = onnx_summary(c)
    assert info["ops"] == {"Gemm": 2, "Relu": 2, "Add": 1, "Conv": 1, "Flatten": 1, "MatMul": 1, "Mul": 1, "Sigmoid": 1}
    assert info["quantized_weights"] == 4 and info["activations"] is None


def test_written_metadata_keys_are_specified(tiny, tmp_path):
    from qconvert.container import format as fmt

    spec = {k["key"]: k for k in json.loads((Path(__file__).resolve().parents[1] / "spec" / "metadata_keys.json").read_text())["keys"]}
    quantize_onnx(tiny, tmp_path / "m.q", calib=tiny.parent / "calib")
    with load(tmp_path / "m.q") as c:
        assert {"onnx.graph", "onnx.weights", "onnx.activations"} <= set(c.metadata)
        for key in c.metadata:
            assert key in spec, f"{key} is written but not in spec/metadata_keys.json"
            assert fmt.VALUE_TYPE_NAMES[c.metadata_types[key]] == spec[key]["type"]
        # the fixed header's checksum is structure: checked on open, not listed in c.metadata
        assert all(key in c.metadata for key, k in spec.items() if k["always_written"] and key != fmt.PREAMBLE_CRC_KEY)


def test_same_inputs_same_bytes(tiny, tmp_path):
    quantize_onnx(tiny, tmp_path / "a.q", bits=4)
    quantize_onnx(tiny, tmp_path / "b.q", bits=4)
    assert (tmp_path / "a.q").read_bytes() == (tmp_path / "b.q").read_bytes()


def test_keep_and_tensor_type(tiny, tmp_path):
    r = quantize_onnx(tiny, tmp_path / "k.q", keep="conv", tensor_types=["g1_w=Q4_0"])
    types = {p.name: p.type_name for p in r.plans}
    assert types == {"conv_w": "F32", "mm_w": "Q8_0", "g1_w": "Q4_0", "g2_w": "Q8_0"}
    x = np.load(tiny.parent / "x.npy")
    y, _ = run_container(tmp_path / "k.q", {"x": x}, engine="reference")
    assert rel(y["y"], fp32(tiny, x)) < 0.2


# --------------------------------------------------------------------------- run


@pytest.mark.parametrize("kw, tol", [({}, 0.02), ({"group": 32}, 0.02), ({"bits": 4}, 0.3)])
def test_run_weight_only_reference_engine(tiny, tmp_path, kw, tol):
    out = tmp_path / "w.q"
    quantize_onnx(tiny, out, **kw)
    x = np.load(tiny.parent / "x.npy")
    y, info = run_container(out, {"x": x}, engine="reference")
    assert info["engine"] == "reference"
    assert 0 < rel(y["y"], fp32(tiny, x)) < tol


def test_run_engines_agree(tiny, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "s.q"
    quantize_onnx(tiny, out, bits=4, calib=tiny.parent / "calib", observer="percentile")
    x = np.load(tiny.parent / "x.npy")
    a, ia = run_container(out, {"x": x})
    b, ib = run_container(out, {"x": x}, engine="reference")
    assert ia["engine"] == "onnxruntime" and ib["engine"] == "reference"
    assert rel(a["y"], b["y"]) < 1e-5


@pytest.mark.parametrize("observer", OBSERVERS)
def test_static_w8a8_each_observer(tiny, tmp_path, observer):
    out = tmp_path / f"{observer}.q"
    quantize_onnx(tiny, out, calib=tiny.parent / "calib", observer=observer)
    calib = [np.load(p) for p in sorted((tiny.parent / "calib").glob("*.npy"))]
    with load(out) as c:
        acts = c.metadata["onnx.activations"]
        assert c.recipe["calibration"]["samples"] == 5 and c.recipe["calibration"]["observer"] == observer
    assert acts["observer"] == observer and set(acts["tensors"]) == {"x", "fl", "h", "g1r"}
    a = acts["tensors"]["x"]
    assert a["nodes"] == [0] and 0 <= a["zero_point"] <= 255
    if observer == "minmax":  # the range of the graph input is exactly what the files hold
        lo = min(float(v.min()) for v in calib)
        hi = max(float(v.max()) for v in calib)
        assert a["range"] == [lo, hi]
        assert a["scale"] == float(np.float32((hi - lo) / 255))
    x = np.load(tiny.parent / "x.npy")
    y, info = run_container(out, {"x": x}, engine="reference")
    assert "uint8 static" in info["mode"]
    assert rel(y["y"], fp32(tiny, x)) < 0.25


@pytest.mark.parametrize("observer", OBSERVERS)
def test_static_w8a8_qdq_export_matches_run(tiny, tmp_path, observer):
    pytest.importorskip("onnxruntime")
    out = tmp_path / f"{observer}.q"
    quantize_onnx(tiny, out, calib=tiny.parent / "calib", observer=observer)
    x = np.load(tiny.parent / "x.npy")
    y, _ = run_container(out, {"x": x})
    s = export_qdq(out, tmp_path / f"{observer}.qdq.onnx")
    assert s["activations"] == 4 and s["weights"]["per_channel"] == 4 and s["opset"] == 13
    exported = onnx.load(str(tmp_path / f"{observer}.qdq.onnx"))
    assert sum(n.op_type == "QuantizeLinear" for n in exported.graph.node) == 4
    dq = [t for t in exported.graph.initializer if t.name == "conv_w_quantized"][0]
    assert dq.data_type == TensorProto.INT8 and list(dq.dims) == [8, 3, 3, 3]
    assert rel(ort_run(tmp_path / f"{observer}.qdq.onnx", x), y["y"]) <= 1e-4


@pytest.mark.parametrize("kw, kinds", [({}, {"per_channel": 4}), ({"group": 32}, {"per_channel": 1, "blocked": 3}),
                                       ({"bits": 4}, {"blocked": 3, "nbits": 1})])
def test_weight_only_export_matches_run(tiny, tmp_path, kw, kinds):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "w.q"
    quantize_onnx(tiny, out, **kw)
    s = export_qdq(out, tmp_path / "w.onnx")
    assert {k: v for k, v in s["weights"].items() if v} == kinds
    x = np.load(tiny.parent / "x.npy")
    y, _ = run_container(out, {"x": x})
    assert rel(ort_run(tmp_path / "w.onnx", x), y["y"]) <= 1e-4
    ops = {n.op_type for n in onnx.load(str(tmp_path / "w.onnx")).graph.node}
    assert ("MatMulNBits" in ops) == ("nbits" in kinds)


def test_fp16_model(tmp_path):
    pytest.importorskip("onnxruntime")
    src = tmp_path / "half.onnx"
    onnx.save(tiny_model(fp16=True), str(src))
    quantize_onnx(src, tmp_path / "h.q", tensor_types=["g1_w=Q8_0"])
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float16)
    y, _ = run_container(tmp_path / "h.q", {"x": x})
    assert y["y"].dtype == np.float16
    assert rel(y["y"], ort_run(src, x)) < 0.05
    export_qdq(tmp_path / "h.q", tmp_path / "h.onnx")
    assert rel(ort_run(tmp_path / "h.onnx", x), y["y"]) <= 2e-3  # float16 arithmetic


def test_external_data(tmp_path):
    src = tmp_path / "ext" / "model.onnx"
    src.parent.mkdir()
    onnx.save(tiny_model(seed=2), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    out = tmp_path / "e.q"
    quantize_onnx(src, out)
    with load(out) as c:
        assert [f["name"] for f in c.source["files"]] == ["model.onnx", "weights.bin"]
    x = np.random.default_rng(4).standard_normal((1, 3, 8, 8)).astype(np.float32)
    ref = ReferenceEvaluator(onnx.load(str(src))).run(None, {"x": x})[0]
    y, _ = run_container(out, {"x": x}, engine="reference")
    assert rel(y["y"], ref) < 0.02
    (src.parent / "weights.bin").unlink()
    with pytest.raises(QConvertError, match="external data file 'weights.bin', which is missing"):
        quantize_onnx(src, tmp_path / "f.q")


# --------------------------------------------------------------------------- errors


def test_calibration_files_that_do_not_fit(tiny, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "a.npy", np.zeros((3, 8, 8)))
    with pytest.raises(QConvertError, match=r"calibration file a\.npy holds float64 \[3, 8, 8\]; the model expects x: float32 \[N, 3, 8, 8\]"):
        quantize_onnx(tiny, tmp_path / "o.q", calib=bad)
    (bad / "a.npy").unlink()
    with pytest.raises(QConvertError, match="has no .npy or .npz files"):
        quantize_onnx(tiny, tmp_path / "o.q", calib=bad)
    with pytest.raises(QConvertError, match="unknown observer"):
        quantize_onnx(tiny, tmp_path / "o.q", calib=tiny.parent / "calib", observer="bogus")
    with pytest.raises(QConvertError, match="not available for ONNX models"):
        quantize_onnx(tiny, tmp_path / "o.q", method="gptq")
    assert not (tmp_path / "o.q").exists()


def test_cli_quantize_inspect_run_export(tiny, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "qconvert", *map(str, args)], capture_output=True, text=True, timeout=300)

    q = tmp_path / "c.q"
    p = cli("quantize", tiny, "-o", q, "--calib", tiny.parent / "calib", "--observer", "mse")
    assert p.returncode == 0, p.stderr
    p = cli("inspect", q)
    assert p.returncode == 0, p.stderr
    assert "2x Gemm" in p.stdout and "weights: 4 of 4 quantized" in p.stdout and "mm_w" in p.stdout
    p = cli("inspect", q, "--json")
    assert json.loads(p.stdout)["onnx"]["ops"]["Conv"] == 1
    y = tmp_path / "y.npy"
    p = cli("run", q, "--input", tiny.parent / "x.npy", "--output", y, "--json", "--engine", "reference")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["engine"] == "reference" and info["outputs"]["y"]["shape"] == [4, 10]
    assert np.load(y).shape == (4, 10)
    np.save(tmp_path / "bad.npy", np.zeros((4, 3, 8, 8), np.float64))
    p = cli("run", q, "--input", tmp_path / "bad.npy")
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert "holds float64 [4, 3, 8, 8]; the model expects x: float32 [N, 3, 8, 8]" in p.stderr
    p = cli("eval", q, "--text", y)
    assert p.returncode == 1 and "holds an ONNX graph" in p.stderr
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return
    p = cli("run", q, "--input", f"x={tiny.parent / 'x.npy'}")
    assert p.returncode == 0 and "ran with onnxruntime" in p.stderr
    p = cli("export", q, "--to", "onnx", "-o", tmp_path / "c.onnx")
    assert p.returncode == 0 and "4 per-channel int8" in p.stdout, p.stderr


# --------------------------------------------------------------------------- the real detector


@pytest.mark.shared
@pytest.mark.skipif(not DETECTOR.exists(), reason=f"needs {DETECTOR} (the shared/ folder beside the repo); absent here")
def test_ddddocr_detector(tmp_path):
    pytest.importorskip("onnxruntime")
    from qconvert.onnx.runner import Runner
    from qconvert.onnx.testdata import compare_detections, detector_inputs, yolox_detections

    calib = tmp_path / "calib"
    calib.mkdir()
    for i, x in enumerate(detector_inputs(4, seed=100)):
        np.save(calib / f"{i}.npy", x)
    xs = detector_inputs(3, seed=1)
    refs = [ort_run(DETECTOR, x, "images") for x in xs]
    for name, kw, max_mean in (("w8", {}, 0.02), ("w8a8", {"calib": calib, "observer": "percentile"}, 0.12)):
        out = tmp_path / f"{name}.q"
        quantize_onnx(DETECTOR, out, **kw)
        with load(out) as c:
            assert len(c.tensors) == 83 and onnx_summary(c)["ops"]["Conv"] == 83
            r = Runner(c)
            ys = [r.run({"images": x})["output"] for x in xs]
            r.close()
        mean = np.mean([np.abs(y - ref).mean() for y, ref in zip(ys, refs)])
        assert mean < max_mean, (name, mean)
        matches = [compare_detections(yolox_detections(ref), yolox_detections(y)) for y, ref in zip(ys, refs)]
        assert sum(m["matched"] for m in matches) >= 0.8 * sum(m["ref"] for m in matches) > 0
        export_qdq(out, tmp_path / f"{name}.onnx")
        assert rel(ort_run(tmp_path / f"{name}.onnx", xs[0], "images"), ys[0]) <= 1e-4
