"""Parity with HF transformers: T5's relative-position buckets and Bloom's ALiBi slopes."""

import jax.numpy as jnp
import numpy as np
import pytest

from pe_research.encodings.alibi import alibi_slopes
from pe_research.encodings.t5 import t5_relative_position_bucket

REASON = "parity tests need the dev requirements (torch, transformers); CI installs them"
torch = pytest.importorskip("torch", reason=REASON)
pytest.importorskip("transformers", reason=REASON)
from transformers.models.bloom.modeling_bloom import build_alibi_tensor  # noqa: E402
from transformers.models.t5.modeling_t5 import T5Attention  # noqa: E402

RELATIVE_POSITIONS = np.arange(-5000, 5001)  # key − query, both signs, far past max_distance.


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(
  "num_buckets, max_distance", [(32, 128), (64, 256), (16, 64), (8, 20), (128, 1024), (40, 77)]
)
def test_t5_buckets_equal_hf(bidirectional, num_buckets, max_distance):
  want = T5Attention._relative_position_bucket(
    torch.from_numpy(RELATIVE_POSITIONS),
    bidirectional=bidirectional,
    num_buckets=num_buckets,
    max_distance=max_distance,
  ).numpy()
  got = t5_relative_position_bucket(
    jnp.asarray(RELATIVE_POSITIONS),
    bidirectional=bidirectional,
    num_buckets=num_buckets,
    max_distance=max_distance,
  )
  np.testing.assert_array_equal(got, want)


def test_alibi_slopes_equal_bloom_for_1_to_128_heads():
  for num_heads in range(1, 129):
    # Bloom's tensor is slope_h · (position of the key); at position 1 it is the slope itself.
    alibi = build_alibi_tensor(torch.ones(1, 2), num_heads, torch.float32)
    want = alibi[:, 0, 1].numpy()
    # Bloom raises a float32 base to integer powers; we round 2^(−8k/n) once: a few ulp apart.
    np.testing.assert_allclose(alibi_slopes(num_heads), want, rtol=2e-6, err_msg=f"{num_heads=}")
