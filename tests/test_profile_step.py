"""tools/profile_step.py on the CPU with a tiny ViT: both loops are profiled and their time sorted into categories."""
from __future__ import annotations

import json

import profile_step


def test_profiles_both_loops_into_categories(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert profile_step.main(["--model", "test_vit", "--img-size", "32", "--batch-size", "8", "--num-classes", "10",
                              "--device", "cpu", "--amp", "fp32", "--steps", "3", "--warmup", "1",
                              "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [r["loop"] for r in results] == ["baseline", "ours"]
    for r in results:
        cats = r["categories_ms"]
        assert set(cats) == {"attention", "optimizer", "gemm", "copies", "norm_elementwise", "other"}
        assert min(cats.values()) >= 0 and cats["gemm"] > 0 and r["step_ms"] > 0 and r["top_kernels_ms"]


def test_kernel_names_land_in_their_category():
    assert profile_step.category("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert profile_step.category("void pytorch_flash::flash_fwd_kernel<...>") == "attention"
    assert profile_step.category("triton_per_fused_native_layer_norm_0") == "norm_elementwise"
    assert profile_step.category("void at::native::(anonymous)::multi_tensor_apply_kernel<FusedAdamMathFunctor>") \
        == "optimizer"
    assert profile_step.category("Memcpy HtoD (Pageable -> Device)") == "copies"
    assert profile_step.category("some_new_kernel") == "other"
