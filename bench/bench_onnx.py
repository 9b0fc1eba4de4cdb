"""ONNX detector quantization: qconvert's containers next to onnxruntime's ``quantize_static``.

    pip install onnxruntime          # not a qconvert dependency; the bench needs it
    python bench/bench_onnx.py [--model ../shared/models/onnx/ddddocr-det/common_det.onnx]
                               [--calib 32] [--eval 32] [--threads 1] [--skip-ort]

Inputs are captcha-like scenes rendered with numpy (``qconvert/onnx/testdata.py``: smooth
photographic backgrounds, translucent shapes, interference curves, rotated bitmap letters and
CJK-like glyphs), letterboxed as ddddocr does (BGR 0..255, 416x416, padding 114). The
calibration set (seed 0) and the evaluation set (seed 1) are different images.

Rows:

- qconvert: weight-only (per-channel int8, Q4_0) and static W8A8 (per-channel int8 weights,
  uint8 per-tensor activations at the input of every Conv) with each observer, run by
  ``qconvert run``'s runner (onnxruntime, the graph's QDQ semantics);
- onnxruntime ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, default
  operator set -- it also quantizes Sigmoid/Mul/Concat/... and Conv outputs -- and a second run
  restricted to ``op_types_to_quantize=["Conv"]``) with MinMax, Entropy and Percentile on the
  same calibration images (its defaults: Percentile 99.999 on 2048 bins; Entropy on 128 bins,
  which leaves a single candidate, i.e. the max -- so one more Entropy run with 2048 bins),
  run by onnxruntime with its default session options (how its models are meant to run). onnxruntime's per-channel mode needs opset >= 13: it gets the model
  converted by ``onnx.version_converter`` (same graph).

Columns: file size; max / mean |y - y_fp32| over all outputs (raw head: box regressions,
objectness, class score); the max error of the objectness; detections after ddddocr's
post-processing (score > 0.1, NMS 0.45): F1 of boxes matched at IoU >= 0.5 against the fp32
detections, and the mean IoU of the matched pairs. Then, for each qconvert container, the QDQ
export (``qconvert export --to onnx``) run by onnxruntime against ``qconvert run``: max |diff|
relative to max |y| with onnxruntime's QDQ transformers off (the graph as written) and with its
default options (integer kernels / other float orders, where the uint8 rounding amplifies
float-order differences).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qconvert import load  # noqa: E402
from qconvert.onnx import export_qdq, quantize_onnx  # noqa: E402
from qconvert.onnx.runner import Runner  # noqa: E402
from qconvert.onnx.testdata import compare_detections, detector_inputs, yolox_detections  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "onnx" / "ddddocr-det" / "common_det.onnx"


def ort_session(path, threads: int, qdq_transformers: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not qdq_transformers:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def metrics(refs: list[np.ndarray], ys: list[np.ndarray]) -> dict:
    err = [np.abs(y.astype(np.float64) - r) for y, r in zip(ys, refs)]
    obj = max(float(e[..., 4].max()) for e in err)
    matched = n_ref = n_test = 0
    ious: list[float] = []
    for y, r in zip(ys, refs):
        m = compare_detections(yolox_detections(r), yolox_detections(y))
        matched += m["matched"]
        n_ref += m["ref"]
        n_test += m["test"]
        ious += m["ious"]
    return {
        "max": max(float(e.max()) for e in err),
        "mean": float(np.mean([e.mean() for e in err])),
        "obj": obj,
        "f1": 2 * matched / max(n_ref + n_test, 1),
        "iou": float(np.mean(ious)) if ious else float("nan"),
        "dets": n_ref,
    }


def human(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--calib", type=int, default=32, help="calibration images")
    ap.add_argument("--eval", type=int, default=32, help="evaluation images")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-ort", action="store_true", help="leave out onnxruntime's quantize_static rows")
    args = ap.parse_args()
    if not args.model.exists():
        sys.exit(f"no model at {args.model} (pass --model)")
    import onnx
    import onnxruntime

    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    calib_dir = tmp / "calib"
    calib_dir.mkdir()
    calib = detector_inputs(args.calib, seed=0)
    for i, x in enumerate(calib):
        np.save(calib_dir / f"{i:03d}.npy", x)
    xs = detector_inputs(args.eval, seed=1)
    name = onnx.load(str(args.model), load_external_data=False).graph.input[0].name
    fp32 = ort_session(args.model, args.threads)
    refs = [fp32.run(None, {name: x})[0].astype(np.float64) for x in xs]
    scale = max(float(np.abs(r).max()) for r in refs)
    rows = [("fp32 (onnxruntime)", args.model.stat().st_size, metrics(refs, [r.astype(np.float32) for r in refs]), "")]
    exports = []

    configs = [("qconvert int8 weight-only", {}), ("qconvert Q4_0 weight-only", {"bits": 4})]
    configs += [(f"qconvert W8A8 {obs}", {"calib": calib_dir, "observer": obs}) for obs in ("minmax", "percentile", "entropy", "mse")]
    for label, kw in configs:
        out = tmp / (label.split()[-1] + "-" + label.split()[1] + ".q")
        t0 = time.perf_counter()
        quantize_onnx(args.model, out, **kw)
        tq = time.perf_counter() - t0
        with load(out) as c:
            r = Runner(c, threads=args.threads)
            ys = [r.run({name: x})[next(iter(r.session.output_names))] for x in xs]
            r.close()
        rows.append((label, out.stat().st_size, metrics(refs, ys), f"{tq:.1f} s"))
        qdq = out.with_suffix(".qdq.onnx")
        summary = export_qdq(out, qdq)
        plain = ort_session(qdq, args.threads, qdq_transformers=False)
        default = ort_session(qdq, args.threads)
        d_plain = max(float(np.abs(plain.run(None, {name: x})[0] - y).max()) for x, y in zip(xs, ys))
        d_default = max(float(np.abs(default.run(None, {name: x})[0] - y).max()) for x, y in zip(xs, ys))
        exports.append((label, qdq.stat().st_size, summary, d_plain / scale, d_default / scale))
        print(f"  {label}: done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)

    if not args.skip_ort:
        from onnx import version_converter
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

        m13 = tmp / "model-opset13.onnx"
        onnx.save(version_converter.convert_version(onnx.load(str(args.model)), 13), str(m13))

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(calib)

            def get_next(self):
                x = next(self.it, None)
                return None if x is None else {name: x}

        qz = sys.modules["onnxruntime.quantization.quantize"]
        create_calibrator = qz.create_calibrator

        def entropy_2048(*a, **k):  # quantize_static cannot pass num_bins; its default 128 leaves one candidate
            k["extra_options"] = {**(k.get("extra_options") or {}), "num_bins": 2048}
            return create_calibrator(*a, **k)

        runs = [(ops, method, False) for ops in (None, ["Conv"])
                for method in (CalibrationMethod.MinMax, CalibrationMethod.Entropy, CalibrationMethod.Percentile)]
        runs.append((None, CalibrationMethod.Entropy, True))
        for ops, method, bins2048 in runs:
            out = tmp / f"ort-{method.name}-{'conv' if ops else 'all'}{'-2048' if bins2048 else ''}.onnx"
            t0 = time.perf_counter()
            qz.create_calibrator = entropy_2048 if bins2048 else create_calibrator
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    quantize_static(str(m13), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                    calibrate_method=method, op_types_to_quantize=ops)
            finally:
                qz.create_calibrator = create_calibrator
            tq = time.perf_counter() - t0
            s = ort_session(out, args.threads)
            ys = [s.run(None, {name: x})[0] for x in xs]
            label = f"onnxruntime {method.name}" + (" (Conv only)" if ops else "") + (" (2048 bins)" if bins2048 else "")
            rows.append((label, out.stat().st_size, metrics(refs, ys), f"{tq:.1f} s"))
            print(f"  {label}: done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)

    print(f"\nModel `{args.model.name}`, {args.calib} calibration / {args.eval} evaluation images (different seeds),"
          f" onnxruntime {onnxruntime.__version__}, {args.threads} thread(s); {rows[0][2]['dets']} fp32 detections;"
          f" output scale max|y| = {scale:.3f}.\n")
    print("| model | file | max abs err | mean abs err | objectness max err | detection F1 | matched IoU | quantize time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, size, m, tq in rows:
        print(f"| {label} | {human(size)} | {m['max']:.4f} | {m['mean']:.5f} | {m['obj']:.4f} | {m['f1']:.3f} | {m['iou']:.4f} | {tq} |")
    print("\nQDQ export (`qconvert export --to onnx`) run by onnxruntime vs `qconvert run` on the same container"
          " (max |diff| / max |y_fp32|):\n")
    print("| container | QDQ file | weights | activation Q/DQ | QDQ transformers off | onnxruntime defaults |")
    print("|---|---:|---|---:|---:|---:|")
    for label, size, s, dp, dd in exports:
        w = ", ".join(f"{v} {k}" for k, v in s["weights"].items() if v)
        print(f"| {label} | {human(size)} | {w} | {s['activations']} | {dp:.2e} | {dd:.2e} |")
    print(f"\n({time.perf_counter() - t_start:.0f} s in all; files in {tmp})", file=sys.stderr)


if __name__ == "__main__":
    main()
