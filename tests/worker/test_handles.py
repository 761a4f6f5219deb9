"""The fused-layout map: how vLLM's fused tensors split into Hugging Face parameters."""

from __future__ import annotations

import pytest

from hogwild.handles import ExporterIdentity, Manifest, ManifestError, TensorEntry, ViewEntry, build_views

CONFIG = {
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_size": 128,
    "intermediate_size": 256,
    "vocab_size": 457,
}
VLLM_SHAPES = {
    "model.embed_tokens.weight": (512, 128),
    "model.layers.0.self_attn.qkv_proj.weight": (256, 128),
    "model.layers.0.self_attn.qkv_proj.bias": (256,),
    "model.layers.0.self_attn.o_proj.weight": (128, 128),
    "model.layers.0.mlp.gate_up_proj.weight": (512, 128),
    "model.layers.0.self_attn.q_norm.weight": (32,),
    "lm_head.weight": (512, 128),
}
EXPECTED = {
    "model.embed_tokens.weight": ("model.embed_tokens.weight", (0, 457)),
    "model.layers.0.self_attn.q_proj.weight": ("model.layers.0.self_attn.qkv_proj.weight", (0, 128)),
    "model.layers.0.self_attn.k_proj.weight": ("model.layers.0.self_attn.qkv_proj.weight", (128, 192)),
    "model.layers.0.self_attn.v_proj.weight": ("model.layers.0.self_attn.qkv_proj.weight", (192, 256)),
    "model.layers.0.self_attn.v_proj.bias": ("model.layers.0.self_attn.qkv_proj.bias", (192, 256)),
    "model.layers.0.self_attn.o_proj.weight": ("model.layers.0.self_attn.o_proj.weight", None),
    "model.layers.0.mlp.gate_proj.weight": ("model.layers.0.mlp.gate_up_proj.weight", (0, 256)),
    "model.layers.0.mlp.up_proj.weight": ("model.layers.0.mlp.gate_up_proj.weight", (256, 512)),
    "model.layers.0.self_attn.q_norm.weight": ("model.layers.0.self_attn.q_norm.weight", None),
    "lm_head.weight": ("lm_head.weight", (0, 457)),
}


@pytest.mark.parametrize(("hf_name", "expected"), EXPECTED.items(), ids=EXPECTED.keys())
def test_views_slice_fused_and_padded_tensors(hf_name: str, expected: tuple) -> None:
    views = {v.name: (v.source, v.rows) for v in build_views(VLLM_SHAPES, CONFIG)}
    assert views[hf_name] == expected


def test_every_fused_row_is_covered_exactly_once() -> None:
    views = build_views(VLLM_SHAPES, CONFIG)
    qkv = sorted(v.rows for v in views if v.source.endswith("qkv_proj.weight"))  # type: ignore[type-var]
    assert qkv == [(0, 128), (128, 192), (192, 256)]


BAD_LAYOUTS = {
    "qkv rows off": {"model.layers.0.self_attn.qkv_proj.weight": (250, 128)},
    "vocab too small": {"model.embed_tokens.weight": (400, 128)},
}


@pytest.mark.parametrize("shapes", BAD_LAYOUTS.values(), ids=BAD_LAYOUTS.keys())
def test_unknown_layouts_are_refused(shapes: dict) -> None:
    with pytest.raises(ManifestError):
        build_views(shapes, CONFIG)


def test_manifest_json_round_trip() -> None:
    manifest = Manifest(
        backend="shm",
        payload="/dev/shm/x",
        exporter=ExporterIdentity(1, 2.0, "n"),
        model_path="/m",
        dtype="bfloat16",
        tensors=(TensorEntry("a", "bfloat16", (2, 3), 64),),
        views=(ViewEntry("a", "a", (0, 2)),),
        hf_config={"vocab_size": 2},
    )
    assert Manifest.from_json(manifest.to_json()) == manifest


@pytest.mark.parametrize(
    "text",
    [
        "nope",
        '{"format": "other"}',
        '{"format": "hogwild-weights", "version": 9}',
        '{"format": "hogwild-weights", "version": 1, "backend": "shm"}',
    ],
    ids=["not json", "other format", "future version", "missing fields"],
)
def test_bad_manifests_raise_manifest_error(text: str) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_json(text)
