"""The low-latency kernels divide by host-computed divisors (cuda/fast_divmod.cuh): multiply-high, add, shift. The
extension's host build runs the same arithmetic; it must equal integer division over the whole documented range."""

import random

import pytest


def _ext():
    from jax_ep import _cuda
    if _cuda.extension_error() is not None:
        pytest.skip("CUDA extension not built")
    return _cuda.extension()


LARGEST = 2**31 - 1


@pytest.mark.parametrize("divisor", [1, 2, 3, 5, 7, 8, 31, 127, 128, 129, 255, 256, 896, 1000, 4096, 7168,
                                     65535, 65536, 2**20 + 1, 2**30, 2**30 + 1, LARGEST - 1, LARGEST])
def test_fast_divide_equals_integer_division(divisor):
    rng = random.Random(divisor)
    numerators = sorted({0, 1, divisor - 1, divisor, divisor + 1, 2 * divisor - 1, 2 * divisor, LARGEST, LARGEST - 1,
                         LARGEST - divisor, *range(0, 3000), *(rng.randrange(0, LARGEST + 1) for _ in range(3000))})
    numerators = [n for n in numerators if 0 <= n <= LARGEST]
    assert _ext().fast_divide(divisor, numerators) == [n // divisor for n in numerators]


def test_fast_divide_random_divisors():
    rng = random.Random(0)
    for _ in range(300):
        divisor = rng.randrange(1, LARGEST + 1)
        numerators = [rng.randrange(0, LARGEST + 1) for _ in range(200)]
        assert _ext().fast_divide(divisor, numerators) == [n // divisor for n in numerators]


def test_fast_divide_rejects_what_the_kernels_never_pass():
    ext = _ext()
    with pytest.raises(ValueError, match="divisor"):
        ext.fast_divide(0, [1])
    with pytest.raises(ValueError, match="numerators"):
        ext.fast_divide(3, [-1])
    with pytest.raises(ValueError, match="numerators"):
        ext.fast_divide(3, [2**31])
