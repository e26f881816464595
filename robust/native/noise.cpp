// Counter-based Gaussian noise for the feature-noise defenses (CPU, float32).
//
// Every noise value is a pure function of (seed, element index): Philox4x32-10
// (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011) turns the counter (block index, 0, 0) and the 64-bit key `seed` into
// four 32-bit words, and the Box-Muller transform turns each pair of words into two
// independent N(0, 1) values.  Element i takes lane i % 4 of block i / 4.  Because
// nothing depends on the order of generation, the work splits over threads freely,
// and the backward pass regenerates the very same noise instead of storing it.
//
// The loops are written over short fixed-size arrays with branch-free bodies (log
// and sin/cos are polynomials here, not libm calls) so the compiler vectorises
// them; the library is compiled for the host CPU by robust/native/__init__.py.
#include <cstdint>
#include <cstring>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <vector>
#include <algorithm>

namespace {

constexpr int kBlocks = 64;                 // Philox blocks per chunk
constexpr int kChunk = 4 * kBlocks;         // noise values per chunk
constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;    // Philox4x32 multipliers
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key schedule increments

// One Philox4x32 round on the counter words (c0, c1, c2, c3) with round key (k0, k1).
inline void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kMul1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
}

__attribute__((noinline)) void philox_chunk(uint64_t seed, uint64_t first_block, float* __restrict z) {
    uint32_t c0[kBlocks], c1[kBlocks], c2[kBlocks], c3[kBlocks];
    const uint32_t k0_init = static_cast<uint32_t>(seed), k1_init = static_cast<uint32_t>(seed >> 32);
    for (int b = 0; b < kBlocks; ++b) {
        const uint64_t ctr = first_block + static_cast<uint64_t>(b);
        c0[b] = static_cast<uint32_t>(ctr);
        c1[b] = static_cast<uint32_t>(ctr >> 32);
        c2[b] = 0u;
        c3[b] = 0u;
    }
    uint32_t k0 = k0_init, k1 = k1_init;
    for (int round = 0; round < 10; ++round) {
        for (int b = 0; b < kBlocks; ++b) philox_round(c0[b], c1[b], c2[b], c3[b], k0, k1);
        k0 += kWeyl0;
        k1 += kWeyl1;
    }
    // Box-Muller on the pairs (c0, c1) and (c2, c3).
    for (int b = 0; b < kBlocks; ++b) {
        for (int pair = 0; pair < 2; ++pair) {
            const uint32_t a = pair ? c2[b] : c0[b];
            const uint32_t t = pair ? c3[b] : c1[b];
            // u in (0, 1]: 32-bit resolution near 0, so the largest |z| is about 6.7.
            const float u = (static_cast<float>(a) + 0.5f) * 2.3283064365386963e-10f;
            // log(u) = e ln 2 + log(m), m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s).
            uint32_t bits;
            std::memcpy(&bits, &u, 4);
            int32_t e = static_cast<int32_t>((bits >> 23) & 0xFF) - 127;
            uint32_t mbits = (bits & 0x007FFFFFu) | 0x3F800000u;
            float m;
            std::memcpy(&m, &mbits, 4);
            const bool big = m > 1.41421356f;
            m = big ? 0.5f * m : m;
            e = big ? e + 1 : e;
            const float s = (m - 1.0f) / (m + 1.0f);
            const float s2 = s * s;
            const float logm = 2.0f * s * (1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9)))));
            const float logu = static_cast<float>(e) * 0.69314718056f + logm;
            const float r = __builtin_sqrtf(-2.0f * logu);
            // angle 2 pi v, v in [0, 1): reduce to q quarter turns plus |x| <= 1/8 turn.
            const float v = static_cast<float>(t >> 8) * 5.9604644775390625e-08f;
            const float q = __builtin_floorf(4.0f * v + 0.5f);
            const float x = 6.28318530718f * (v - 0.25f * q);
            const float x2 = x * x;
            const float sn = x * (1.0f + x2 * (-1.0f / 6 + x2 * (1.0f / 120 + x2 * (-1.0f / 5040 + x2 * (1.0f / 362880)))));
            const float cs = 1.0f + x2 * (-0.5f + x2 * (1.0f / 24 + x2 * (-1.0f / 720 + x2 * (1.0f / 40320))));
            const int qi = static_cast<int>(q) & 3;
            const float cosv = qi == 0 ? cs : (qi == 1 ? -sn : (qi == 2 ? -cs : sn));
            const float sinv = qi == 0 ? sn : (qi == 1 ? cs : (qi == 2 ? -sn : -cs));
            z[4 * b + 2 * pair] = r * cosv;
            z[4 * b + 2 * pair + 1] = r * sinv;
        }
    }
}

inline int64_t chunk_count(int64_t n) { return (n + kChunk - 1) / kChunk; }

// Threads worth starting for n values: at most `threads`, each with at least 64 chunks
// (16k values; below that starting a thread costs more than it saves).
inline int thread_count(int64_t n, int threads) {
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, chunk_count(n) / 64)));
}

// body(first_chunk, end_chunk, thread_index) over `t` contiguous ranges of chunks.  The
// threads are OpenMP's: the library links libgomp.so.1, which resolves to the runtime
// PyTorch has already loaded, so the kernels run on PyTorch's own warm thread pool rather
// than beside it (a second pool would contend with its spinning workers).
template <typename Body>
void parallel_chunks(int64_t n, int t, Body body) {
    const int64_t chunks = chunk_count(n);
    if (t <= 1) {
        body(0, chunks, 0);
        return;
    }
    const int64_t per = (chunks + t - 1) / t;
#ifdef _OPENMP
#pragma omp parallel num_threads(t)
    {
        const int k = omp_get_thread_num();
        const int64_t lo = k * per, hi = std::min(chunks, lo + per);
        if (lo < hi) body(lo, hi, k);
    }
#else
    for (int k = 0; k < t; ++k) {
        const int64_t lo = k * per, hi = std::min(chunks, lo + per);
        if (lo < hi) body(lo, hi, k);
    }
#endif
}

// For the chunks [lo, hi): draw each chunk's noise, then call run(pos, j, m, z) on each run of
// consecutive features in it (elements pos .. pos + m - 1 have features j .. j + m - 1, noise z[0..m)).
template <typename Run>
void feature_runs(uint64_t seed, int64_t lo, int64_t hi, int64_t n, int64_t f, Run run) {
    alignas(64) float z[kChunk];
    for (int64_t c = lo; c < hi; ++c) {
        const int64_t start = c * kChunk, len = std::min<int64_t>(kChunk, n - start);
        philox_chunk(seed, static_cast<uint64_t>(start / 4), z);
        for (int64_t i = 0, j = start % f; i < len; j = 0) {
            const int64_t m = std::min<int64_t>(len - i, f - j);
            run(start + i, j, m, z + i);
            i += m;
        }
    }
}

}  // namespace

extern "C" {

// Philox4x32-10 of one counter and key (the known-answer tests of Random123 check it).
void robust_philox4x32_10(const uint32_t* ctr, const uint32_t* key, uint32_t* out) {
    uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3], k0 = key[0], k1 = key[1];
    for (int round = 0; round < 10; ++round) {
        philox_round(c0, c1, c2, c3, k0, k1);
        k0 += kWeyl0;
        k1 += kWeyl1;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
}

// z[i] = N(0, 1) noise of element i, for i in [0, n).
void robust_normal(float* out, int64_t n, uint64_t seed, int threads) {
    parallel_chunks(n, thread_count(n, threads), [=](int64_t lo, int64_t hi, int) {
        alignas(64) float z[kChunk];
        for (int64_t c = lo; c < hi; ++c) {
            const int64_t start = c * kChunk, len = std::min<int64_t>(kChunk, n - start);
            philox_chunk(seed, static_cast<uint64_t>(start / 4), z);
            std::memcpy(out + start, z, sizeof(float) * len);
        }
    });
}

// out[i] = h[i] + theta[i % f] * z[i]: h and out hold n = batch * f values.
void robust_noise_forward(const float* h, const float* theta, float* out, int64_t n, int64_t f,
                          uint64_t seed, int threads) {
    parallel_chunks(n, thread_count(n, threads), [=](int64_t lo, int64_t hi, int) {
        feature_runs(seed, lo, hi, n, f, [=](int64_t pos, int64_t j, int64_t m, const float* __restrict zs) {
            const float* __restrict hs = h + pos;
            const float* __restrict ts = theta + j;
            float* __restrict os = out + pos;
            for (int64_t k = 0; k < m; ++k) os[k] = hs[k] + ts[k] * zs[k];
        });
    });
}

// grad_theta[j] = sum over the batch of grad[b * f + j] * z[b * f + j].
void robust_noise_grad_theta(const float* grad, float* grad_theta, int64_t n, int64_t f, uint64_t seed,
                             int threads) {
    const int t = thread_count(n, threads);
    std::vector<float> partial(static_cast<size_t>(t) * f, 0.0f);
    parallel_chunks(n, t, [&](int64_t lo, int64_t hi, int k) {
        float* acc = partial.data() + static_cast<size_t>(k) * f;
        feature_runs(seed, lo, hi, n, f, [=](int64_t pos, int64_t j, int64_t m, const float* __restrict zs) {
            const float* __restrict gs = grad + pos;
            float* __restrict as = acc + j;
            for (int64_t i = 0; i < m; ++i) as[i] += gs[i] * zs[i];
        });
    });
    for (int64_t j = 0; j < f; ++j) {
        float s = 0.0f;
        for (int k = 0; k < t; ++k) s += partial[static_cast<size_t>(k) * f + j];
        grad_theta[j] = s;
    }
}

}  // extern "C"
