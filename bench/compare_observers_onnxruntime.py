"""Our calibration observers next to onnxruntime's calibrators, on the same data.

    pip install onnxruntime          # not a qconvert dependency; only this script needs it
    python bench/compare_observers_onnxruntime.py [--n 1000000] [--batches 10]

Each data set is fed in ``--batches`` batches, to our observers (``update`` per batch) and to
onnxruntime's ``MinMaxCalibrater`` / ``PercentileCalibrater`` / ``EntropyCalibrater`` through a
one-node ONNX graph (``Y = Identity(X)``) and a ``CalibrationDataReader``; we read the range
onnxruntime finds for ``X``. All thresholds are symmetric 8-bit amax values (onnxruntime's
entropy range is ``(lo, hi)``, clipped to the data's min/max; we print ``max(-lo, hi)``).

Settings: percentile 99.99 on both sides (onnxruntime's default is 99.999); onnxruntime's entropy
with ``num_bins=2048`` (its default 128 leaves a single candidate) and ``num_quantized_bins`` 128
(its default) and 256 (the same number of levels as TensorRT's 128 per side of |x|). onnxruntime
has no MSE calibrator. The second table is the int8 fake-quantization error of the data at each
threshold (symmetric, 127 levels a side), relative to minmax's: below 1 = better than minmax.
"TRT grid" = our entropy/mse search run on TensorRT's own one-shot histogram (2048 bins over
[0, max|x|], as ``HistogramCalibrator`` builds it) instead of our power-of-two grid (2049..4096
bins): it shows how much the grid alone moves the answer.

Data: uniform[-1, 1]; N(0,1) with 3 outliers (60, -55, 58); Laplace(b=1); and activations of a
small random numpy MLP (inputs N(0,1) with 4 outlier channels x20, as LLM hidden states have):
the GELU hidden layer and the block's output.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qconvert.observers import EntropyObserver, MseObserver, make_observer  # noqa: E402


def datasets(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    out["uniform[-1,1]"] = rng.uniform(-1, 1, n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    g[rng.choice(n, 3, replace=False)] = [60.0, -55.0, 58.0]
    out["N(0,1) + 3 outliers ~60"] = g
    out["Laplace(b=1)"] = rng.laplace(0.0, 1.0, n).astype(np.float32)
    d, h = 256, 1024
    tokens = max(n // h, 64)
    x = rng.standard_normal((tokens, d)).astype(np.float32)
    x[:, [3, 77, 140, 201]] *= 20.0
    w1 = (rng.standard_normal((d, h)) / math.sqrt(d)).astype(np.float32)
    w2 = (rng.standard_normal((h, d)) / math.sqrt(h)).astype(np.float32)
    pre = x @ w1
    hid = 0.5 * pre * (1.0 + np.tanh(0.7978845608 * (pre + 0.044715 * pre**3)))  # GELU (tanh)
    out[f"MLP GELU hidden ({tokens}x{h})"] = hid.astype(np.float32).reshape(-1)
    out[f"MLP block output ({tokens}x{d})"] = (x + hid @ w2).astype(np.float32).reshape(-1)
    return out


def identity_model(path: str) -> None:
    import onnx
    from onnx import TensorProto, helper

    X = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch"])
    Y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch"])
    graph = helper.make_graph([helper.make_node("Identity", ["X"], ["Y"])], "calib", [X], [Y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def ort_amax(model: str, tmp: str, batches, method, **extra) -> tuple[float, float]:
    from onnxruntime.quantization.calibrate import CalibrationDataReader, create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {"X": b}

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime prints progress
        cal = create_calibrator(
            model, None, os.path.join(tmp, f"aug_{method.name}.onnx"), calibrate_method=method, extra_options=extra
        )
        cal.collect_data(Reader())
        data = cal.compute_data()
    dt = time.perf_counter() - t0
    print(f"  onnxruntime {method.name} {extra}: {dt:.1f} s", file=sys.stderr)
    lo, hi = (float(np.asarray(v).reshape(-1)[0]) for v in data["X"].range_value)
    return max(-lo, hi), dt


def ours(name: str, batches, **options) -> tuple[float, float]:
    t0 = time.perf_counter()
    obs = make_observer(name, **options)
    for b in batches:
        obs.update(b)
    amax = obs.threshold(8)
    return amax, time.perf_counter() - t0


def trt_grid(x: np.ndarray) -> tuple[float, float]:
    """Our entropy/mse searches on TensorRT's own one-shot grid: 2048 bins over [0, max|x|]."""
    a = np.abs(x.astype(np.float64))
    counts, edges = np.histogram(a, bins=2048, range=(0.0, float(a.max())))
    i, _ = EntropyObserver().search_index(counts)
    k, _ = MseObserver().search_index(counts)
    return float(edges[i]), float((edges[k] + edges[k + 1]) / 2)


def int8_err(x: np.ndarray, amax: float) -> float:
    s = amax / 127.0
    return float(np.mean((np.clip(np.rint(x / s), -127, 127) * s - x) ** 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="values per synthetic data set")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import onnxruntime
    from onnxruntime.quantization.calibrate import CalibrationMethod as M

    rng = np.random.default_rng(args.seed)
    # warm the numba kernels so the timings below are calibration, not compilation
    for name in ("minmax", "percentile", "entropy", "mse"):
        ours(name, [rng.standard_normal(5000)])

    rows, errs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "identity.onnx")
        identity_model(model)
        for label, x in datasets(args.n, rng).items():
            x = x[: x.size - x.size % args.batches]  # onnxruntime stacks batches: equal sizes
            batches = np.split(x, args.batches)
            r = {}
            r["mm"], _ = ours("minmax", batches)
            r["mm_ort"], _ = ort_amax(model, tmp, batches, M.MinMax, symmetric=True)
            r["pc"], _ = ours("percentile", batches, percentile=99.99)
            r["pc_ort"], _ = ort_amax(model, tmp, batches, M.Percentile, percentile=99.99, num_bins=2048)
            r["en"], r["t_en"] = ours("entropy", batches)
            r["en_ort128"], r["t_en_ort"] = ort_amax(
                model, tmp, batches, M.Entropy, num_bins=2048, num_quantized_bins=128
            )
            r["en_ort256"], _ = ort_amax(model, tmp, batches, M.Entropy, num_bins=2048, num_quantized_bins=256)
            r["ms"], r["t_ms"] = ours("mse", batches)
            r["en_trt"], r["ms_trt"] = trt_grid(x)
            rows.append((label, x.size, r))
            base = int8_err(x, r["mm"])
            errs.append(
                (label, {k: int8_err(x, r[k]) / base for k in r if not k.startswith(("t_", "mm"))})
            )

    print(f"onnxruntime {onnxruntime.__version__}, numpy {np.__version__}; {args.batches} batches per data set\n")
    print(
        "| data | values | minmax ours / ORT | percentile 99.99 ours / ORT "
        "| entropy ours / TRT grid / ORT q128 / ORT q256 | mse ours / TRT grid "
        "| time entropy ours / ORT q128 | time mse |"
    )
    print("|---|---:|---|---|---|---|---|---:|")
    for label, n, r in rows:
        print(
            f"| {label} | {n:,} | {r['mm']:.5g} / {r['mm_ort']:.5g} | {r['pc']:.5g} / {r['pc_ort']:.5g} "
            f"| {r['en']:.5g} / {r['en_trt']:.5g} / {r['en_ort128']:.5g} / {r['en_ort256']:.5g} "
            f"| {r['ms']:.5g} / {r['ms_trt']:.5g} "
            f"| {r['t_en'] * 1e3:.0f} ms / {r['t_en_ort'] * 1e3:.0f} ms | {r['t_ms'] * 1e3:.0f} ms |"
        )
    print("\nint8 fake-quantization MSE of the data at each threshold, relative to minmax's (lower = better):\n")
    print("| data | percentile ours / ORT | entropy ours / TRT grid / ORT q128 / ORT q256 | mse ours / TRT grid |")
    print("|---|---|---|---|")
    for label, e in errs:
        print(
            f"| {label} | {e['pc']:.3g} / {e['pc_ort']:.3g} | {e['en']:.3g} / {e['en_trt']:.3g} / "
            f"{e['en_ort128']:.3g} / {e['en_ort256']:.3g} | {e['ms']:.3g} / {e['ms_trt']:.3g} |"
        )


if __name__ == "__main__":
    main()
