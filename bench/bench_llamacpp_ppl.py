"""llama.cpp's perplexity on our exported GGUF vs `qconvert eval` on the container it came from.

    python bench/bench_llamacpp_ppl.py [--method q4_k_m] [--chunks 20] [--work /tmp/qconvert-bench]

Needs llama-cpp-python. Same protocol on both sides (llama-perplexity's: windows of 512 tokens
of wiki.test.raw with CRLF -> LF, second halves scored); the token ids are checked equal first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared"
GGUF = SHARED / "models" / "smollm2-135m-instruct-q4_1-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"

import qconvert  # noqa: E402
from qconvert.evaluate import evaluate, make_windows, read_text  # noqa: E402
from qconvert.export.gguf import export_gguf  # noqa: E402
from qconvert.runtime.models import load_model  # noqa: E402
from qconvert.runtime.tokenizer import Tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="q4_k_m")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--work", default="/tmp/qconvert-bench")
    args = ap.parse_args()
    import llama_cpp

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    container = work / f"smollm2.{args.method}.export.q"
    gguf_out = work / f"smollm2.{args.method}.export.gguf"
    qconvert.quantize(GGUF, container, method=args.method, allow_requantize=True)
    text = read_text(WIKI)
    with qconvert.load(container) as c:
        export_gguf(c, gguf_out)
        tok = Tokenizer.from_container(c)
        tokens = tok.encode(text, add_bos=False)
        bos = tok.bos_id if tok.add_bos_default else None
        ours = evaluate(load_model(c), tokens, 512, args.chunks, bos)
    llm = llama_cpp.Llama(str(gguf_out), n_ctx=512, n_batch=512, logits_all=True, verbose=False, n_threads=2)
    theirs_tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
    n_check = 512 * args.chunks
    same = theirs_tokens[:n_check] == tokens[:n_check]
    nll = []
    for w in make_windows(tokens, 512, args.chunks, bos):
        llm.reset()
        llm.eval(w.tolist())
        logits = np.array(llm.scores[:512], dtype=np.float64)
        logits = logits[256:511]
        m = logits.max(axis=1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
        nll.append(-logp[np.arange(255), w[257:]])
    ppl_llama = float(np.exp(np.concatenate(nll).mean()))
    print(f"SmolLM2 {args.method.upper()} ({gguf_out.stat().st_size / 2**20:.1f} MiB GGUF exported by qconvert), "
          f"{ours.chunks} windows of 512 ({ours.tokens_scored} tokens scored)\n")
    print("| evaluator | PPL |")
    print("|---|---:|")
    print(f"| qconvert eval (container) | {ours.ppl:.4f} |")
    print(f"| llama.cpp via llama-cpp-python {llama_cpp.__version__} (exported GGUF) | {ppl_llama:.4f} |")
    print(f"\nrelative difference {100 * (ppl_llama / ours.ppl - 1):+.3f}%; "
          f"llama.cpp's tokenization of the text {'equals' if same else 'DIFFERS from'} ours on the first {n_check} tokens")


if __name__ == "__main__":
    main()
