"""Peak memory and time of qconvert on the issue #14 B.3 reproducers, rebuilt at full size.

    python bench/hostile_memory.py [--mb 100]

Each input is written to a temporary folder and handed to the CLI in a fresh process, whose
peak RSS (VmHWM: getrusage's ru_maxrss would include the parent's, Linux keeps it across exec)
and wall time are printed; RELIABILITY.md quotes the figures.

- a container with ~100 MB of JSON metadata (`[-100,-100,...]`: json.loads would make ~4 GB of
  objects from it), through `qconvert inspect`;
- a safetensors file with a ~100 MB header (one entry per tensor, 1.2 million entries),
  through `qconvert quantize`;
- a GGUF file with a ~100 MB UINT8 metadata array, through `qconvert quantize`.
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUN = (
    "import resource, sys, time\n"
    "from qconvert.cli import main\n"
    "t = time.time()\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "    code = 0\n"
    "except SystemExit as e:\n"
    "    code = e.code\n"
    "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
    "print('RESULT', code, hwm // 1024, round(time.time() - t, 2))\n"
)


def measure(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True, cwd=REPO)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    _, code, rss, seconds = line.split()
    return {"exit": int(code), "peak_rss_mib": int(rss), "seconds": float(seconds),
            "message": proc.stderr.strip().splitlines()[-1][:160] if proc.stderr.strip() else ""}


def container_with_metadata(path: Path, mb: int) -> None:
    import qconvert
    from tests.conftest import make_hf_folder
    from tests.test_container import _rewrite_entry, _set_kv

    small = path.with_suffix(".small.q")
    qconvert.quantize(make_hf_folder(path.parent / "hf"), small, method="rtn", bits=8)
    n = mb * 1_000_000 // 5
    blob = b"[" + b"-100," * n + b"1]"
    path.write_bytes(_rewrite_entry(small.read_bytes(), _set_kv("x.json", 7, blob)))


def safetensors_with_header(folder: Path, mb: int) -> None:
    from tests.conftest import make_hf_folder

    make_hf_folder(folder)
    entries, size = [], 0
    i = 0
    while size < mb * 1_000_000:
        e = f'"t.{i}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}'
        entries.append(e)
        size += len(e) + 1
        i += 1
    header = ("{" + ",".join(entries) + "}").encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4 * i))


def gguf_with_array(path: Path, mb: int) -> None:
    key = b"general.big"
    n = mb * 1_000_000
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
    path.write_bytes(data + struct.pack("<iiQ", 9, 0, n) + bytes(n))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = {}
        c = tmp / "meta.q"
        container_with_metadata(c, args.mb)
        results["container metadata (inspect)"] = {"input_mb": round(c.stat().st_size / 1e6, 1), **measure("inspect", str(c))}
        f = tmp / "st"
        safetensors_with_header(f, args.mb)
        results["safetensors header (quantize)"] = {
            "input_mb": round((f / "model.safetensors").stat().st_size / 1e6, 1),
            **measure("quantize", str(f), "-o", str(tmp / "o1.q"))}
        g = tmp / "big.gguf"
        gguf_with_array(g, args.mb)
        results["GGUF array (quantize)"] = {"input_mb": round(g.stat().st_size / 1e6, 1),
                                            **measure("quantize", str(g), "-o", str(tmp / "o2.q"))}
        results["baseline: inspect of a small container"] = measure("inspect", str(c.with_suffix(".small.q")))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
