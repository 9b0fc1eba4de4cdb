"""Why plain GPTQ at W3 g128 does not beat RTN on SmolLM2: the variations BENCHMARKS.md quotes.

    python bench/diagnose_gptq_w3.py massive
    python bench/diagnose_gptq_w3.py variant NAME [--samples 16] [--damp 0.01] [--calib FILE]
        [--drop-first-token] [--mse] [--act-order] [--seed 0] [--chunks 20]

``massive``: float forward of the 16 tinyshakespeare calibration windows (seed 0) through
every block (the calibration pipeline, with a probe step); per block and per linear input
(q/k/v, o, gate/up, down), the share of the Hessian's trace ``Σ_t |x_t|²`` that comes from the
first token of each window. SmolLM2 puts massive activations there.

``variant``: GPTQ W3 g128 (asym) of the SmolLM2 GGUF with one setting changed, evaluated as in
bench/bench_quality.py (wiki.test.raw, 20 windows of 512, KLD against the F32 import).
``--drop-first-token`` leaves the first token of every window out of every Hessian (it still
goes through the forward passes); ``--calib`` picks another calibration text (wiki.test.raw
itself overlaps the evaluation windows: a diagnostic, not a result).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
GGUF = SHARED / "models" / "smollm2-135m-instruct-q4_1-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
CALIB = SHARED / "data" / "tinyshakespeare" / "input.txt"

import numpy as np  # noqa: E402

import qconvert  # noqa: E402


def massive() -> None:
    from qconvert.arch import by_name
    from qconvert.calibrate import Step, run_pipeline
    from qconvert.calibration import calibration_set
    from qconvert.recipe import source_loader, tokenizer_for
    from qconvert.sources import open_source

    def first_token_share(X: np.ndarray) -> str:
        e = (X.astype(np.float64) ** 2).sum(-1)  # (windows, tokens)
        return f"{e[:, 0].sum() / e.sum():.3f}"

    class Probe(Step):
        """Prints, per block, the first-token share of each linear group's input."""

        def begin_layer(self, run) -> None:
            self.row, self.x = [], run.x

        def on_input(self, layer, names, x) -> None:
            self.row.append(first_token_share(x))

        def end_layer(self, run) -> None:
            print(f"| {run.layer.index} | {' | '.join(self.row)} |", flush=True)

    with open_source(str(GGUF)) as src:
        cal = calibration_set(tokenizer_for(src), CALIB, 16, 512, 0)
        load, names = source_loader(src, "the probe")
        print("share of the Hessian trace from the first token of each window\n")
        print("| block | q/k/v input | o_proj input | gate/up input | down_proj input |")
        print("|---:|---:|---:|---:|---:|")
        run_pipeline(by_name(src.architecture), src.config, load, names, cal.tokens, [Probe()])


def variant(a: argparse.Namespace) -> None:
    from qconvert.evaluate import evaluate, read_text, reference_logprobs
    from qconvert.methods import gptq
    from qconvert.runtime.models import load_model
    from qconvert.runtime.tokenizer import Tokenizer

    if a.drop_first_token:
        add_batch = gptq.Hessian.add_batch

        def without_first_token(self, X):
            X = np.asarray(X)
            return add_batch(self, X[:, 1:] if X.ndim == 3 else X)  # (windows, tokens, in)

        gptq.Hessian.add_batch = without_first_token
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "smollm2.f32.q"
    if not f32.exists():
        qconvert.quantize(GGUF, f32, method="f32")
    out = work / f"smollm2.gptq-w3-{a.name}.q"
    t0 = time.perf_counter()
    qconvert.quantize(GGUF, out, method="gptq", bits=3, group=128, sym=False, calib=a.calib,
                      calib_samples=a.samples, calib_seqlen=512, seed=a.seed, damp=a.damp,
                      act_order=a.act_order, mse=a.mse, allow_requantize=True)
    seconds = time.perf_counter() - t0
    with qconvert.load(f32) as ref_c, qconvert.load(out) as c:
        tok = Tokenizer.from_container(c)
        tokens = tok.encode(read_text(WIKI), add_bos=False)
        bos = tok.bos_id if tok.add_bos_default else None
        ref_logp = reference_logprobs(load_model(ref_c), tokens, 512, a.chunks, bos)
        r = evaluate(load_model(c), tokens, 512, a.chunks, bos, reference_logp=ref_logp)
    print(f"| {a.name} | {r.ppl:.4f} | {r.reference['kld_mean']:.5f} | {100 * r.reference['top1_agreement']:.2f}% "
          f"| {seconds:.0f} s |")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("massive")
    v = sub.add_parser("variant")
    v.add_argument("name")
    v.add_argument("--samples", type=int, default=16)
    v.add_argument("--damp", type=float, default=0.01)
    v.add_argument("--calib", type=Path, default=CALIB)
    v.add_argument("--drop-first-token", action="store_true")
    v.add_argument("--mse", action="store_true")
    v.add_argument("--act-order", action="store_true")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--chunks", type=int, default=20)
    v.add_argument("--work", default="/tmp/qconvert-bench-diagnose")
    a = ap.parse_args()
    massive() if a.what == "massive" else variant(a)


if __name__ == "__main__":
    main()
