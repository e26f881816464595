"""The native feature-noise kernels: the generator is Philox4x32-10, the values are N(0, 1),
the fused forward and backward agree with h + theta * z, and the fallback works."""
from __future__ import annotations

import ctypes
import math
import os
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

import robust.native as native
from robust.native import noise as native_noise

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C++ compiler: the PyTorch path is used")

MASK = 0xFFFFFFFF

# Random123's tests/kat_vectors, the three "philox4x32 10" lines: counter, key, expected output.
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _philox_reference(ctr, key):
    """Philox4x32-10 in Python integers, from the published round function."""
    c, k = list(ctr), list(key)
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & MASK, (p0 >> 32) ^ c[3] ^ k[1], p0 & MASK]
        k = [(k[0] + 0x9E3779B9) & MASK, (k[1] + 0xBB67AE85) & MASK]
    return c


def _box_muller_reference(seed: int, count: int) -> np.ndarray:
    """Element i: lane i % 4 of block i / 4, counter (block, 0, 0) and key = seed; pairs
    (w0, w1) and (w2, w3) give (r cos a, r sin a) with u = (w + 1/2) 2^-32, a = 2 pi (w >> 8) 2^-24."""
    out = []
    for block in range((count + 3) // 4):
        words = _philox_reference((block & MASK, block >> 32, 0, 0), (seed & MASK, seed >> 32))
        for a, t in ((words[0], words[1]), (words[2], words[3])):
            r = math.sqrt(-2.0 * math.log((a + 0.5) * 2.0 ** -32))
            angle = 2.0 * math.pi * (t >> 8) * 2.0 ** -24
            out += [r * math.cos(angle), r * math.sin(angle)]
    return np.array(out[:count])


def test_philox_matches_the_random123_known_answers():
    lib = native.library()
    for ctr, key, expected in KAT:
        c = (ctypes.c_uint32 * 4)(*ctr)
        k = (ctypes.c_uint32 * 2)(*key)
        out = (ctypes.c_uint32 * 4)()
        lib.robust_philox4x32_10(c, k, out)
        assert tuple(out) == expected
        assert tuple(_philox_reference(ctr, key)) == expected


@pytest.mark.parametrize("seed", [0, 12345, 2 ** 62 + 987654321])
def test_normal_values_are_box_muller_of_the_philox_words(seed):
    count = 1030  # several chunks of 256 plus a partial one
    got = native_noise.normal((count,), seed).double().numpy()
    expected = _box_muller_reference(seed, count)
    # float32 arithmetic with polynomial log/sin/cos agrees to a few float32 ulps; where u is
    # near 1 (|z| near 0) float32 holds u to 2^-24, which moves z by up to about 1e-5 absolute
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-5)


def test_normal_is_standard_normal_and_uncorrelated():
    z = native_noise.normal((1_000_000,), 2024).double().numpy()
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    tail = np.mean(np.abs(z) > 3)
    assert abs(tail - 2 * stats.norm.sf(3)) < 5 * math.sqrt(2 * stats.norm.sf(3) / n)
    # neighbours share a Philox block (lanes 0-3) or a Box-Muller pair (lanes 0-1, 2-3)
    for lag in (1, 2, 3, 4, 256):
        assert abs(np.corrcoef(z[:-lag], z[lag:])[0, 1]) < 5 / math.sqrt(n)
    # squares too: the pair (r cos a, r sin a) is uncorrelated but would show dependence in r
    sq = z ** 2
    assert abs(np.corrcoef(sq[0::2], sq[1::2])[0, 1]) < 5 / math.sqrt(n / 2)
    other = native_noise.normal((n,), 2025).double().numpy()
    assert abs(np.corrcoef(z, other)[0, 1]) < 5 / math.sqrt(n)


def _noise_of(out: torch.Tensor, h: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return (out - h) / theta


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_forward_is_h_plus_theta_z_and_backward_matches(layout):
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(5, 3, 6, 7, generator=gen)
    if layout == "channels_last":
        h = h.contiguous(memory_format=torch.channels_last)
    h.requires_grad_(True)
    theta = (0.1 + torch.rand(3, 6, 7, generator=gen)).requires_grad_(True)
    seed = 99
    out = native_noise._NativeFeatureNoise.apply(h, theta, seed)
    # the noise is the native stream in the memory order of h
    z_mem = native_noise.normal((h.numel(),), seed)
    if layout == "channels_last":
        z = z_mem.view(5, 6, 7, 3).permute(0, 3, 1, 2)
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        z = z_mem.view(5, 3, 6, 7)
        assert out.is_contiguous()
    torch.testing.assert_close(out, (h + theta * z).detach(), rtol=1e-6, atol=1e-6)
    g = torch.randn(5, 3, 6, 7, generator=gen)
    out.backward(g)
    torch.testing.assert_close(h.grad, g)
    torch.testing.assert_close(theta.grad, (g * z).sum(0), rtol=1e-5, atol=1e-5)


def test_add_feature_noise_follows_the_generator_and_thread_count():
    h = torch.randn(32, 16, 8, 8)
    theta = torch.full((16, 8, 8), 0.5)
    a = native_noise.add_feature_noise(h, theta, torch.Generator().manual_seed(3))
    b = native_noise.add_feature_noise(h, theta, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(3)
    first, second = (native_noise.add_feature_noise(h, theta, g) for _ in range(2))
    assert not torch.equal(first, second)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = native_noise.add_feature_noise(h, theta, torch.Generator().manual_seed(3))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, serial)  # element i's value depends only on (seed, i)
    z = _noise_of(a, h, theta)
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05


def test_one_openmp_runtime_in_the_process():
    """The kernels' libgomp.so.1 resolves to the one PyTorch loaded (one thread pool)."""
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("no /proc/self/maps")
    with open("/proc/self/maps", encoding="utf-8") as f:
        paths = {line.split()[-1] for line in f if "libgomp" in line}
    # other packages may bring runtimes of their own under hashed names (scikit-learn's
    # libgomp-<hash>.so.1); the soname libgomp.so.1 must be mapped once, from PyTorch
    plain = {p for p in paths if os.path.basename(p).startswith("libgomp.so")}
    assert len(plain) == 1, paths
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    if any(p.startswith(torch_dir) for p in paths):
        assert all(p.startswith(torch_dir) for p in plain), paths


def test_disabled_kernels_fall_back_to_torch(monkeypatch):
    monkeypatch.setenv("ROBUST_NATIVE", "0")
    h = torch.randn(4, 2, 3, 3)
    theta = torch.full((2, 3, 3), 0.3)
    out = native_noise.add_feature_noise(h, theta, torch.Generator().manual_seed(11))
    expected = h + theta * torch.randn(h.shape, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(out, expected)


def test_missing_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setenv("ROBUST_NATIVE_CACHE", str(tmp_path))
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None  # decided once: no second warning
    h = torch.randn(4, 2, 3, 3)
    out = native_noise.add_feature_noise(h, torch.full((2, 3, 3), 0.3), torch.Generator().manual_seed(1))
    assert out.shape == h.shape and not torch.equal(out, h)
    assert not any(tmp_path.iterdir())


def test_build_is_cached_and_written_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv("ROBUST_NATIVE_CACHE", str(tmp_path))
    first = native._build()
    stamp = first.stat().st_mtime_ns
    assert native._build() == first and first.stat().st_mtime_ns == stamp
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".build-")]
    assert leftovers == []


def test_an_unusable_home_builds_in_the_temp_directory(monkeypatch, tmp_path):
    home = tmp_path / "home-is-a-file"   # no folder can be made under it, even by root
    home.write_text("")
    monkeypatch.delenv("ROBUST_NATIVE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    root = native._cache_root()
    assert root.parent == tmp_path / "tmp"
    first = native._build()
    assert first.is_relative_to(root) and first.exists()
