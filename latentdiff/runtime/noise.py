"""torch's CPU normal draws in numpy: the same numbers `torch.randn(shape, generator=torch.Generator().manual_seed(s))`
gives, so that a seed means the same image with or without torch.

torch's CPU generator is MT19937 seeded with the seed's low 32 bits (the reference `init_genrand`); a float32
`normal_` of n ≥ 16 values fills the tensor with uniforms u = (x & (2²⁴ − 1)) · 2⁻²⁴ of successive 32-bit draws x,
then turns each block of 16 into normals by Box–Muller, (u_j, u_{j+8}) → √(−2 ln(1 − u_j)) (cos, sin)(2π u_{j+8});
when n is not a multiple of 16 the last 16 values are drawn again and transformed as one block. torch computes the
logarithm, cosine and sine with SIMD routines accurate to about one ulp, so the values agree to a few ulps, not bit
for bit (tests/test_runtime.py).
"""

from __future__ import annotations

import numpy as np

_MASK32 = 0xFFFFFFFF


class TorchGenerator:
    """`torch.Generator().manual_seed(seed)` for float32 normal draws of at least 16 values."""

    def __init__(self, seed: int):
        key = np.empty(624, dtype=np.uint64)
        key[0] = value = seed & _MASK32
        for i in range(1, 624):  # init_genrand
            value = (1812433253 * (value ^ (value >> 30)) + i) & _MASK32
            key[i] = value
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": key.astype(np.uint32), "pos": 624}}

    def _uniform(self, n: int) -> np.ndarray:
        raw = self._bits.random_raw(n).astype(np.uint32)
        return ((raw & np.uint32((1 << 24) - 1)).astype(np.float32) * np.float32(2.0 ** -24)).astype(np.float32)

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape))
        if n < 16:
            raise ValueError(f"torch draws fewer than 16 normals another way; got shape {shape}")
        data = self._uniform(n)
        whole = n - n % 16
        data[:whole] = _box_muller(data[:whole].reshape(-1, 16)).reshape(-1)
        if n % 16:
            data[n - 16:] = _box_muller(self._uniform(16).reshape(1, 16)).reshape(-1)
        return data.reshape(shape)


def _box_muller(blocks: np.ndarray) -> np.ndarray:
    u1, u2 = 1.0 - blocks[:, :8], blocks[:, 8:]
    radius = np.sqrt(np.float32(-2.0) * np.log(u1))
    theta = np.float32(2.0 * np.pi) * u2
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)], axis=1).astype(np.float32)
