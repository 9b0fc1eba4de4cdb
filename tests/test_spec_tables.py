"""FORMAT.md, spec/ and the code must describe the same format: this test keeps them in step."""

from __future__ import annotations

import json
import re

from qconvert import safejson
from qconvert.blocks import all_types
from qconvert.container import format as fmt
from tests.conftest import REPO


def _table(marker: str) -> list[list[str]]:
    text = (REPO / "FORMAT.md").read_text()
    body = text.split(f"<!-- {marker}:begin -->")[1].split(f"<!-- {marker}:end -->")[0]
    rows = [line for line in body.strip().splitlines() if line.startswith("|")]
    return [[c.strip().strip("`") for c in r.strip("|").split("|")] for r in rows[2:]]


def test_block_type_table_matches_spec_and_registry():
    doc = [(int(r[0]), r[1], int(r[2]), int(r[3]), float(r[4]), r[5] == "yes") for r in _table("block-types")]
    spec = json.loads((REPO / "spec" / "block_types.json").read_text())["block_types"]
    spec_rows = [(t["id"], t["name"], t["block_size"], t["type_size"], 8 * t["type_size"] / t["block_size"], t["ggml"]) for t in spec]
    code = [(t.id, t.name, t.block_size, t.type_size, t.bits_per_weight, t.ggml) for t in all_types()]
    assert doc == spec_rows == code


def test_every_block_type_has_a_section_in_format_md():
    text = (REPO / "FORMAT.md").read_text()
    for t in all_types():
        # the group-wise family I{bits}G{group} shares one section
        heading = "I\\{bits\\}G\\{group\\}" if re.fullmatch(r"I\dG\d+", t.name) else t.name
        assert re.search(rf"^### {heading}(?!\w)", text, re.M), f"FORMAT.md lacks a section for {t.name}"


def test_metadata_key_table_matches_spec():
    doc = [(r[0], r[1], r[2] == "yes") for r in _table("metadata-keys")]
    spec = json.loads((REPO / "spec" / "metadata_keys.json").read_text())
    assert doc == [(k["key"], k["type"], k["always_written"]) for k in spec["keys"]]
    assert spec["format_version"] == f"{fmt.MAJOR}.{fmt.MINOR}"
    assert spec["value_types"] == {name: code for code, name in fmt.VALUE_TYPE_NAMES.items()}


def test_header_constants_match_format_md():
    text = (REPO / "FORMAT.md").read_text()
    assert f"format {fmt.MAJOR}.{fmt.MINOR}" in text.splitlines()[0]
    assert "`51 43 56 54` (ASCII `QCVT`)" in text and fmt.MAGIC == b"QCVT"
    assert f"≤ {fmt.MAX_TENSORS:,}" in text and f"≤ {fmt.MAX_KV:,}" in text
    assert f"{fmt.MIN_KV_ENTRY}·n_kv + {fmt.MIN_TENSOR_ENTRY}·n_tensors ≤ header_len" in text
    assert f"at most {fmt.MAX_JSON_MEMORY >> 20} MiB of decoded objects" in text
    assert f"at most {safejson.MAX_DEPTH} levels deep" in text and f"plus {safejson.OBJECT_BYTES} bytes per" in text
    assert f"qconvert writes {fmt.DEFAULT_ALIGNMENT}" in text


def test_written_metadata_keys_are_all_specified(tmp_path):
    import qconvert
    from tests.conftest import make_hf_folder

    qconvert.quantize(make_hf_folder(tmp_path / "t"), tmp_path / "m.q")
    spec = {k["key"]: k for k in json.loads((REPO / "spec" / "metadata_keys.json").read_text())["keys"]}
    with qconvert.load(tmp_path / "m.q") as c:
        for key in c.metadata:
            assert key in spec, f"{key} is written but not in spec/metadata_keys.json"
            assert fmt.VALUE_TYPE_NAMES[c.metadata_types[key]] == spec[key]["type"]
        for key, k in spec.items():
            if k["always_written"] and key != fmt.PREAMBLE_CRC_KEY:  # that one is checked on open, not listed
                assert key in c.metadata
    assert fmt.PREAMBLE_CRC_KEY.encode() in (tmp_path / "m.q").read_bytes()[:200]


def test_fallbacks_are_recorded_in_the_recipe(tmp_path):
    """FORMAT.md §8/§9: a tensor stored in another type than the mix asked for is named in
    recipe.fallbacks; the recipe's group stays the one asked for."""
    import qconvert
    from tests.conftest import make_hf_folder

    qconvert.quantize(make_hf_folder(tmp_path / "t"), tmp_path / "m.q", method="rtn", bits=4, group=128)
    with qconvert.load(tmp_path / "m.q") as c:
        fallbacks = c.recipe["fallbacks"]
        assert c.recipe["group"] == 128
        stored = {n: i.block_type.name for n, i in c.tensors.items()}
    # hidden 64: rows of 64 cannot hold groups of 128; the MLP's down_proj rows of 128 can
    assert fallbacks["model.layers.0.mlp.up_proj.weight"] == "fallback: rows of 64 are not a multiple of I4G128's block of 128"
    assert stored["model.layers.0.mlp.up_proj.weight"] == "I4G64"
    assert "model.layers.0.mlp.down_proj.weight" not in fallbacks and stored["model.layers.0.mlp.down_proj.weight"] == "I4G128"
    assert set(fallbacks) == {n for n, t in stored.items() if t == "I4G64"}
