"""Issue #15: conversion parallel over tensors (byte-identical to the serial path) and bounded
memory (source pages are not left mapped)."""

from __future__ import annotations

import threading

import pytest

from qconvert.convert import quantize
import json

from tests.conftest import make_hf_folder, tiny_llama_config, tiny_llama_tensors


def _k_folder(path):
    """A tiny llama wide enough (256) for k-quant super-blocks, untied, bf16, two shards."""
    folder = make_hf_folder(path, dtype="BF16", shards=2, tied=False,
                            tensors=tiny_llama_tensors(hidden=256, inter=512, tied=False))
    (folder / "config.json").write_text(json.dumps(tiny_llama_config(hidden=256, inter=512, tied=False)))
    return folder


@pytest.mark.parametrize("method,bits", [("rtn", 4), ("q4_k_m", None), ("nf4", None)])
def test_parallel_output_is_byte_identical_to_serial(tmp_path, method, bits):
    folder = _k_folder(tmp_path / "m")
    serial, parallel = tmp_path / "serial.q", tmp_path / "parallel.q"
    quantize(folder, serial, method=method, bits=bits, threads=1)
    seen: list[int] = []
    quantize(folder, parallel, method=method, bits=bits, threads=4,
             progress=lambda i, n, plan: seen.append(i))
    assert serial.read_bytes() == parallel.read_bytes()
    assert seen == list(range(1, len(seen) + 1))  # progress in plan order, from the caller's thread


def test_parallel_bounds_tensors_in_flight(tmp_path, monkeypatch):
    """At most `threads` tensors encode at once, and the largest one encodes alone."""
    import qconvert.convert as convert

    folder = make_hf_folder(tmp_path / "m", tied=False)
    lock, active, peak, alone = threading.Lock(), [], [0], []
    real = convert._encode
    sizes: dict[str, int] = {}

    def spy(plan, *args, **kwargs):
        with lock:
            active.append(plan.name)
            peak[0] = max(peak[0], len(active))
            sizes[plan.name] = convert._work_bytes(plan)
            snapshot = list(active)
        try:
            return real(plan, *args, **kwargs)
        finally:
            with lock:
                active.remove(plan.name)
                alone.append((plan.name, snapshot))

    monkeypatch.setattr(convert, "_encode", spy)
    quantize(folder, tmp_path / "out.q", method="rtn", bits=8, threads=2)
    assert 1 <= peak[0] <= 2
    largest = max(sizes.values())
    for name, snapshot in alone:
        assert sum(sizes[n] for n in snapshot) <= largest or snapshot == [name]


def test_hf_source_reads_into_its_own_buffer(tmp_path):
    """A tensor's bytes are a private, writable copy: nothing of the file stays mapped."""
    from qconvert.sources import open_source

    folder = make_hf_folder(tmp_path / "m", dtype="BF16")
    with open_source(str(folder)) as src:
        raw = src.tensors[0].load_raw()
        assert raw.flags.owndata and raw.flags.writeable
        maps = open("/proc/self/maps").read() if __import__("os").path.exists("/proc/self/maps") else ""
        assert str(folder) not in maps


def _mapped_rss(path) -> int:
    """Resident bytes of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, current = 0, False
    for line in open("/proc/self/smaps"):
        first = line.split()
        if first and "-" in first[0] and len(first) >= 5:  # a mapping's header line
            current = line.rstrip().endswith(str(path))
        elif current and line.startswith("Rss:"):
            total += int(first[1]) * 1024
    return total


def test_gguf_source_releases_mapped_pages(tmp_path):
    """Reading every tensor of a GGUF leaves (almost) none of its pages resident."""
    import os

    from qconvert.sources.gguf import open_gguf
    from tests.conftest import SMOLLM_GGUF, need_shared

    if not os.path.exists("/proc/self/smaps"):
        pytest.skip("needs /proc/self/smaps")
    path = need_shared(SMOLLM_GGUF)
    with open_gguf(path) as src:
        total = 0
        for t in src.tensors:
            total += t.load_raw().nbytes
        resident = _mapped_rss(path.resolve())
    assert total > 50e6
    assert resident < 0.2 * total, (resident, total)  # the header (tokenizer) stays: ~9%
