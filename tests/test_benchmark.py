"""The benchmark harness's own logic (the timings themselves need a GPU)."""

from fa3_jax import benchmark


def test_native_head_dims_of_a_peer_library_come_from_its_kernel_names(tmp_path):
  library = tmp_path / "flash_api.so"
  library.write_bytes(b"\x7fELF\0_ZN_flash_fwd_hdim128_bf16_sm90_cu\0flash_bwd_hdim64_bf16\0"
                      b"_ZN_flash_fwd_hdim128_bf16_paged_sm90\0flash_fwd_hdim256_fp16_sm90\0flash_fwd_hdimall\0")
  assert benchmark.native_head_dims(library) == {128, 256}


def test_flops_follow_the_flashattention_convention():
  fwd = benchmark.attention_flops(2, 1024, 16, 128, False, "fwd")
  assert fwd == 4 * 2 * 16 * 1024 * 1024 * 128
  assert benchmark.attention_flops(2, 1024, 16, 128, True, "fwd") == fwd / 2
  assert benchmark.attention_flops(2, 1024, 16, 128, False, "bwd") == 2.5 * fwd
