"""W8A8 on SmolLM2-135M: PPL and KLD vs F32 for each activation observer, with and without
SmoothQuant, next to weight-only Q8_0.

    python bench/bench_w8a8.py [--chunks 20] [--calib-samples 16] [--calib-seqlen 512] [--alpha 0.5]
                               [--observers minmax,percentile,entropy,mse] [--work /tmp/qconvert-bench-w8a8]

Every model is made by ``qconvert.quantize`` (the same code as ``qconvert quantize``):
- F32 (the reference): ``--method f32`` of the Q4_1 GGUF (dequantized);
- Q8_0 (weight-only): ``--method rtn --bits 8``;
- W8A8: ``--method w8a8 --calib tinyshakespeare --calib-samples N --calib-seqlen L --observer O
  [--smooth α] [--act-mode static|dynamic]``; one row per observer (static activations), with
  and without SmoothQuant, and the dynamic per-token mode with and without SmoothQuant.

Evaluation is ``qconvert eval MODEL --text wiki.test.raw --chunks C --reference F32`` (the same
function, ``qconvert.evaluate.evaluate``; the reference's log-probabilities are computed once
and shared by every row). Prints a Markdown table. Containers are kept in --work and reused
when they exist (delete the folder to rebuild).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GGUF = SHARED / "models" / "smollm2-135m-instruct-q4_1-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
CALIB = SHARED / "data" / "tinyshakespeare" / "input.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(GGUF))
    ap.add_argument("--text", default=str(WIKI))
    ap.add_argument("--calib", default=str(CALIB))
    ap.add_argument("--chunks", type=int, default=20, help="evaluation windows of --ctx tokens")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    ap.add_argument("--observers", default="minmax,percentile,entropy,mse")
    ap.add_argument("--no-dynamic", action="store_true", help="skip the dynamic per-token rows")
    ap.add_argument("--work", default="/tmp/qconvert-bench-w8a8")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.path.insert(0, str(REPO))
    import qconvert
    from qconvert.container import open_container
    from qconvert.evaluate import evaluate, read_text, reference_logprobs
    from qconvert.runtime.models import load_model
    from qconvert.runtime.tokenizer import Tokenizer
    from qconvert.summary import summarize

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cal = dict(calib=args.calib, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, seed=args.seed)
    # (row label, file stem, quantize kwargs, table columns)
    rows = [("F32 (reference)", "f32", dict(method="f32"), ("-", "-", "-")),
            ("Q8_0 weight-only", "q8_0", dict(method="rtn", bits=8), ("-", "-", "-"))]
    for obs in args.observers.split(","):
        rows.append(("W8A8", f"w8a8-{obs}", dict(method="w8a8", observer=obs, **cal), (obs, "-", "static")))
        rows.append(("W8A8", f"w8a8-{obs}-sq", dict(method="w8a8", observer=obs, smooth=args.alpha, **cal),
                     (obs, str(args.alpha), "static")))
    if not args.no_dynamic:
        rows.append(("W8A8", "w8a8-dynamic", dict(method="w8a8", act_mode="dynamic", **cal), ("-", "-", "dynamic")))
        rows.append(("W8A8", "w8a8-dynamic-sq", dict(method="w8a8", act_mode="dynamic", smooth=args.alpha, **cal),
                     ("-", str(args.alpha), "dynamic")))

    built = {}
    for _label, stem, kw, _cols in rows:
        path = work / f"smollm2.{stem}.q"
        seconds = None
        if not path.exists():
            t0 = time.perf_counter()
            qconvert.quantize(args.model, path, **kw, allow_requantize=True)
            seconds = time.perf_counter() - t0
            print(f"built {path.name} in {seconds:.1f} s", file=sys.stderr)
        built[stem] = (path, seconds)

    with open_container(built["f32"][0]) as ref_c:
        tok = Tokenizer.from_container(ref_c)
        tokens = tok.encode(read_text(args.text), add_bos=False)
        bos = tok.bos_id if tok.add_bos_default else None
        t0 = time.perf_counter()
        ref_logp = reference_logprobs(load_model(ref_c), tokens, ctx=args.ctx, chunks=args.chunks, bos_id=bos)
        print(f"reference log-probabilities: {len(ref_logp)} windows in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    results = []
    for label, stem, kw, (obs, alpha, mode) in rows:
        path, seconds = built[stem]
        with open_container(path) as c:
            bpw = summarize(c)["totals"]["bits_per_weight"]
            r = evaluate(load_model(c), tokens, ctx=args.ctx, chunks=args.chunks, bos_id=bos, reference_logp=ref_logp)
        ref = r.reference
        results.append(dict(label=label, file=path.name, observer=obs, smooth=alpha, act_mode=mode, bpw=bpw,
                            ppl=r.ppl, ref_ppl=ref["ppl"], kld_mean=ref["kld_mean"], kld_p99=ref["kld_p99"],
                            top1=ref["top1_agreement"], rms_dp=ref["rms_dp"], quantize_s=seconds, eval_s=r.seconds))
        print(f"evaluated {path.name}: PPL {r.ppl:.4f}, KLD {ref['kld_mean']:.5f}", file=sys.stderr)

    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized = F32 reference), wiki.test.raw, "
          f"{args.chunks} windows of {args.ctx} tokens; calibration: {Path(args.calib).name}, "
          f"{args.calib_samples} windows of {args.calib_seqlen} (seed {args.seed})\n")
    print("| model | observer | SmoothQuant α | activations | bits/weight | PPL | ΔPPL | mean KLD | KLD p99 | same top-1 | RMS Δp |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for x in results:
        print(f"| {x['label']} | {x['observer']} | {x['smooth']} | {x['act_mode']} | {x['bpw']:.3f} | {x['ppl']:.4f} |"
              f" {x['ppl'] - x['ref_ppl']:+.4f} | {x['kld_mean']:.5f} | {x['kld_p99']:.4f} | {100 * x['top1']:.2f}% |"
              f" {100 * x['rms_dp']:.3f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
