"""Size, bits per weight, perplexity and KL divergence of quantized SmolLM2-135M (or stories260K)
vs its F32 import.

    python bench/bench_quality.py [--set kquants|calibrated|nf4|all] [--model smollm2|stories260k] [--chunks 20]
        [--rows REGEX] [--seed 0]

Protocol = llama.cpp's llama-perplexity (../shared/reference/BASELINES.md): wiki.test.raw with
CRLF -> LF, windows of 512 tokens, second halves scored, first --chunks windows; KLD against the
F32 import of the GGUF (the same F32 model llama.cpp's table uses). Every container is made by
`qconvert.quantize` in this run, and its wall time is printed. With llama-cpp-python installed,
llama-quantize's Q4_K_M wall time on the same F32 model (exported to GGUF) is measured beside ours.
Prints Markdown tables (paste into BENCHMARKS.md with this command line).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
GGUF = SHARED / "models" / "smollm2-135m-instruct-q4_1-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
CALIB = SHARED / "data" / "tinyshakespeare" / "input.txt"
MODELS = {"smollm2": GGUF, "stories260k": SHARED / "models" / "stories260K"}

import qconvert  # noqa: E402
import numpy as np  # noqa: E402

from qconvert.evaluate import evaluate, make_windows, read_text, reference_logprobs  # noqa: E402
from qconvert.runtime.models import load_model  # noqa: E402
from qconvert.runtime.tokenizer import Tokenizer  # noqa: E402

KQUANT_SET = [
    ("Q2_K", dict(method="q2_k")),
    ("Q3_K_M", dict(method="q3_k_m")),
    ("Q4_0", dict(method="rtn", bits=4)),
    ("Q4_K_M", dict(method="q4_k_m")),
    ("Q4_K_M + imatrix", dict(method="q4_k_m", imatrix="IMATRIX")),
    ("Q5_K_M", dict(method="q5_k_m")),
    ("Q6_K", dict(method="q6_k")),
    ("Q8_0", dict(method="rtn", bits=8)),
]
CAL = dict(calib=CALIB, calib_samples=16, calib_seqlen=512, seed=0)
CALIBRATED_SET = [
    ("RTN W4 g128 (asym)", dict(method="rtn", bits=4, group=128, sym=False)),
    ("GPTQ W4 g128 (asym)", dict(method="gptq", bits=4, group=128, sym=False, **CAL)),
    ("GPTQ W4 g128 act-order", dict(method="gptq", bits=4, group=128, sym=False, act_order=True, **CAL)),
    ("GPTQ W4 g128 act-order + mse", dict(method="gptq", bits=4, group=128, sym=False, act_order=True, mse=True, **CAL)),
    ("AWQ W4 g128", dict(method="awq", bits=4, group=128, **CAL)),
    ("AWQ + GPTQ W4 g128 act-order", dict(method="awq+gptq", bits=4, group=128, sym=False, act_order=True, **CAL)),
    ("RTN W3 g128 (asym)", dict(method="rtn", bits=3, group=128, sym=False)),
    ("RTN W3 g128 + mse", dict(method="rtn", bits=3, group=128, sym=False, mse=True)),
    ("GPTQ W3 g128 (asym)", dict(method="gptq", bits=3, group=128, sym=False, **CAL)),
    ("GPTQ W3 g128 + mse", dict(method="gptq", bits=3, group=128, sym=False, mse=True, **CAL)),
    ("GPTQ W3 g128 act-order + mse", dict(method="gptq", bits=3, group=128, sym=False, act_order=True, mse=True, **CAL)),
]
NF4_SET = [
    ("NF4 (block 64)", dict(method="nf4", double_quant=False)),
    ("NF4 + double quant", dict(method="nf4")),
    ("RTN W4 g64 (asym)", dict(method="rtn", bits=4, group=64, sym=False)),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", default="all", choices=["kquants", "calibrated", "nf4", "all"])
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--work", default="/tmp/qconvert-bench")
    ap.add_argument("--model", default="smollm2", choices=list(MODELS))
    ap.add_argument("--rows", help="regular expression: only the rows whose name it finds")
    ap.add_argument("--seed", type=int, default=0, help="calibration sampling seed of the GPTQ/AWQ rows")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = MODELS[args.model]

    f32 = work / f"{args.model}.f32.q"
    if not f32.exists():
        qconvert.quantize(source, f32, method="f32")
    sets = {"kquants": KQUANT_SET, "calibrated": CALIBRATED_SET, "nf4": NF4_SET}
    chosen = [row for name, rows in sets.items() if args.set in (name, "all") for row in rows]
    if args.rows:
        import re

        chosen = [row for row in chosen if re.search(args.rows, row[0])]

    imatrix = work / f"{args.model}.imatrix"
    if any(kw.get("imatrix") for _, kw in chosen) and not imatrix.exists():
        from qconvert.imatrix import collect_imatrix, save_imatrix

        t0 = time.perf_counter()
        with qconvert.load(f32) as c:
            importance, info = collect_imatrix(c, read_text(CALIB), ctx=512, chunks=64)
        save_imatrix(imatrix, importance, info)
        print(f"imatrix: {info['tokens']} tokens of tinyshakespeare in {time.perf_counter() - t0:.0f} s\n")

    with qconvert.load(f32) as c:
        tok = Tokenizer.from_container(c)
        tokens = tok.encode(read_text(WIKI), add_bos=False)
        bos = tok.bos_id if tok.add_bos_default else None
        ref_model = load_model(c)
        ref_logp = reference_logprobs(ref_model, tokens, 512, args.chunks, bos)
    # the reference's own perplexity, from the log-probabilities already computed
    windows = make_windows(tokens, 512, args.chunks, bos)
    ref_nll = np.concatenate([-lp[np.arange(len(w) - 257), w[257:]] for lp, w in zip(ref_logp, windows)])
    ref_ppl = float(np.exp(ref_nll.astype(np.float64).mean()))
    print(f"{args.model} F32: PPL {ref_ppl:.4f} over {len(windows)} windows ({ref_nll.size} tokens scored), "
          f"{f32.stat().st_size / 2**20:.0f} MiB\n")
    print("| model | file size | bits per weight | PPL | PPL(Q)/PPL(F32) | mean KLD | same top-1 | RMS Δp | quantize time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, kw in chosen:
        kw = {k: (imatrix if v == "IMATRIX" else v) for k, v in kw.items()}
        if "seed" in kw:
            kw["seed"] = args.seed
        path = work / (f"{args.model}." + name.lower().replace(" ", "_").replace("+", "").replace("(", "").replace(")", "")
                       + (f".seed{args.seed}" if args.seed else "") + ".q")
        t0 = time.perf_counter()
        try:
            qconvert.quantize(source, path, **kw, allow_requantize=True)
        except qconvert.QConvertError as e:
            print(f"| {name} | – | – | – | – | – | – | – | not available: {e} |")
            continue
        seconds = time.perf_counter() - t0
        with qconvert.load(path) as c:
            n = sum(i.n_elements for i in c.tensors.values())
            nbytes = sum(i.nbytes for i in c.tensors.values())
            r = evaluate(load_model(c), tokens, 512, args.chunks, bos, reference_logp=ref_logp)
        x = r.reference
        print(f"| {name} | {path.stat().st_size / 2**20:.1f} MiB | {8 * nbytes / n:.3f} | {r.ppl:.4f} | {r.ppl / ref_ppl:.4f} "
              f"| {x['kld_mean']:.5f} | {100 * x['top1_agreement']:.2f}% | {100 * x['rms_dp']:.2f}% | {seconds:.1f} s |",
              flush=True)
    print(f"\npeak RSS of this benchmark process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")

    if args.set in ("kquants", "all") and args.model == "smollm2":
        try:
            import llama_cpp
        except ImportError:
            print("\nllama-cpp-python not installed: no llama-quantize timing in this run")
            return
        from qconvert.export.gguf import export_gguf

        f32_gguf = work / "smollm2.f32.gguf"
        if not f32_gguf.exists():
            with qconvert.load(f32) as c:
                export_gguf(c, f32_gguf)
        out = work / "smollm2.q4_k_m.llamacpp.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.nthread = 2
        t0 = time.perf_counter()
        rc = llama_cpp.llama_model_quantize(str(f32_gguf).encode(), str(out).encode(), params)
        t_llama = time.perf_counter() - t0
        t0 = time.perf_counter()
        qconvert.quantize(f32_gguf, work / "smollm2.q4_k_m.again.q", method="q4_k_m")
        t_ours = time.perf_counter() - t0
        print(f"\nQ4_K_M quantization of the same F32 GGUF, 2 threads: qconvert {t_ours:.2f} s, "
              f"llama-quantize (llama-cpp-python {llama_cpp.__version__}) {t_llama:.2f} s (rc {rc})")


if __name__ == "__main__":
    main()
