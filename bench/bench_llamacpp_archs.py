"""Does llama.cpp run our GGUF export of every architecture, and agree with our runtime?

    python bench/bench_llamacpp_archs.py [--archs llama,qwen3,...] [--type f16|f32]

For each architecture of tests/test_architectures.py: the same tiny random transformers model
(fixed seed), converted to an F32 container and exported to GGUF as F16 (or F32); llama.cpp
(llama-cpp-python, built from source) evaluates a 24-token prompt with every position's
logits; our runtime evaluates the same tokens on the same export re-imported. Prints, per
architecture, the share of positions whose top-1 token agrees and the max |logit difference|.
Needs llama-cpp-python (see ../shared/reference/BASELINES.md for the build).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

import qconvert  # noqa: E402
from qconvert.export.gguf import export_gguf  # noqa: E402
from qconvert.runtime.models import load_model  # noqa: E402
from tests.test_architectures import ARCHS, WINDOW, _prompt, _tokenizer_json, make_model  # noqa: E402


def llama_cpp_logits(gguf: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--type", default="f16", choices=["f16", "f32"])
    args = ap.parse_args()
    tok = _tokenizer_json()
    ids = _prompt()
    print(f"{len(ids)}-token prompt, {args.type.upper()} GGUF export, llama-cpp-python vs qconvert on the same file\n")
    print(f"| architecture | GGUF arch | same top-1 | max abs logit diff | max abs logit | same top-1, first {WINDOW} positions |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.archs.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            make_model(name, d / "hf", tok)
            qconvert.quantize(d / "hf", d / "m.q", method=args.type)
            with qconvert.load(d / "m.q") as c:
                export_gguf(c, d / "m.gguf")
            qconvert.quantize(d / "m.gguf", d / "back.q", method="f32")
            with qconvert.load(d / "back.q") as c:
                m = load_model(c)
                ours = m.forward(np.array(ids), m.new_cache(64))
            try:
                ref = llama_cpp_logits(d / "m.gguf", ids)
            except Exception as e:  # noqa: BLE001 - report what llama.cpp said and go on
                print(f"| {name} | {ARCHS[name][4]} | llama.cpp failed: {type(e).__name__}: {e} | | | |", flush=True)
                continue
            same = ours.argmax(-1) == ref.argmax(-1)
            # positions inside the tiny models' sliding window: llama.cpp's llama/phi3 architectures
            # ignore sliding windows (Mistral, Phi-3), so only these agree for such models
            print(f"| {name} | {ARCHS[name][4]} | {100 * same.mean():.1f}% | {np.abs(ours - ref).max():.4f} "
                  f"| {np.abs(ours).max():.2f} | {100 * same[:WINDOW].mean():.1f}% |", flush=True)


if __name__ == "__main__":
    main()
