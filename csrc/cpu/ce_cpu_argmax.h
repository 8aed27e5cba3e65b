// The argmax of the CPU kernels' forward (struct Ce, ce_cpu_kernels.h, which includes this file):
// the first class at a row's max, for the statistics' `predicted` (fwd_rows, fwd_tiles).
#pragma once

namespace nllfused_cpu::NLLF_CPU_NS {

// whether a chunk's max cm is a new best for the argmax: above it, or the first NaN
template <typename scalar_t>
bool Ce<scalar_t>::beats(const State& st, acc_t cm) {
  return cm > st.best || (std::isnan(cm) && !std::isnan(st.best));
}

// The argmax over a chunk z[0, n) of classes c0.. with max cm (from the max sweep): only a chunk
// whose max beats the best so far (beats) is scanned (first_at), for the first class at it. (A NaN
// the max sweep dropped is found by finish_stats.) For a row read in place fwd_rows takes the class
// from the fold, or scans the chunk that held the max once, at the row's end (see there);
// track_argmax scans a chunk copied into a buffer at once. With the max sweep's snapshots, the scan
// starts at the first block of kSnapSteps steps whose running max reached cm (the max's first class
// is in it), instead of at the chunk's start: a new max is met in a few chunks of every row (the
// first ones, mostly), and scanning from the start took a twentieth of the bf16 forward with
// statistics at 32K classes. Where the copy has equal_mask / first_bits_equal (AVX2, AVX-512), a
// step is one compare into a bit mask from which the class follows, in class or split order (Zen 4,
// bf16 (2048, 8192): the scan 6.7 -> 4.2 % of the forward; Intel, bf16 (2048, 32000) with a
// logit_scale, in split order, the argmax +6.7 -> +4.3-5.5 %); else (a NaN max) two vectors a step,
// one test whether any of their lanes holds cm, then the step's classes one by one.
// z[0, split_end) is in split order (load_chunk), where the first class at cm of the step that
// holds it is the least class among its hits.
// src_t bf16: z is the chunk's logits themselves (bits_max; in class order, split_end 0), its
// steps' vectors loaded in split order, and the snapshots bf16 bits -- then a zero max (+0 or -0,
// which compare equal) takes no snapshots: their integer order is not the floats'.
template <typename scalar_t>
template <typename src_t>
void Ce<scalar_t>::track_argmax(State& st, const src_t* z, int64_t c0, int64_t n, acc_t cm,
                                int64_t split_end, const Snaps* snaps) {
  if (!beats(st, cm)) return;
  const int64_t f = first_at(z, n, cm, split_end, snaps);
  if (f >= 0) {
    st.best = cm;
    st.arg = c0 + f;
  }
}

// The first class of z[0, n) at cm (NaN: the first NaN), -1 if none (track_argmax).
template <typename scalar_t>
template <typename src_t>
int64_t Ce<scalar_t>::first_at(const src_t* z, int64_t n, acc_t cm, int64_t split_end,
                               const Snaps* snaps) {
  constexpr bool Raw = !std::is_same_v<src_t, acc_t>;
  const bool nan = std::isnan(cm);
  const V vcm(cm);
  constexpr int kNoHit = int((int64_t(1) << W) - 1);  // zero_mask of a step without a hit
  // Float, cm neither NaN nor (bf16 bits) a zero -- the LM rows -- where the copy has
  // equal_mask / first_bits_equal: a step is one compare into a mask from which the first class
  // at cm follows: its lowest bit in class order; in split order (the steps below split_end:
  // the even classes in the mask's low W bits, the odd ones in its high W bits) the lesser of
  // the two halves' first.
  [[maybe_unused]] bool by_mask = false;
  [[maybe_unused]] uint16_t cm_bits = 0;
#ifdef NLLF_HAVE_EQUAL_MASK
  if constexpr (std::is_same_v<acc_t, float>) {
    by_mask = !nan && !(Raw && cm == 0);
    uint32_t w;
    std::memcpy(&w, &cm, sizeof w);
    cm_bits = static_cast<uint16_t>(w >> 16);
  }
#endif
  // The first class at cm in the step of 2W values at p (by_mask; split: in split order), else
  // 0 for some class at cm (NaN for a NaN cm); -1 for none.
  auto step_first = [&](const src_t* p, bool split) -> int {
#ifdef NLLF_HAVE_EQUAL_MASK
    if constexpr (std::is_same_v<acc_t, float>) {
      if (by_mask) {
        if constexpr (Raw) {
          return first_bits_equal(p, cm_bits);  // (bf16 logits in place: class order)
        } else {
          const uint32_t hit = equal_mask(p, vcm);
          if (hit == 0) return -1;
          if (!split) return __builtin_ctz(hit);
          constexpr uint32_t kLow = (uint32_t(1) << W) - 1;
          const uint32_t even = hit & kLow, odd = hit >> W;
          const int e = even ? 2 * __builtin_ctz(even) : 2 * W;
          const int o = odd ? 2 * __builtin_ctz(odd) + 1 : 2 * W;
          return std::min(e, o);
        }
      }
    }
#endif
    (void)split;
    V a, b;
    load2s<Raw>(p, a, b);
    const V hit = nan ? (a != a) | (b != b) : (a == vcm) | (b == vcm);
    return hit.zero_mask() != kNoHit ? 0 : -1;
  };
  int64_t i = 0;
  if (snaps && !nan && !(Raw && cm == 0)) {  // the blocks before the first snapshot at cm
    int64_t j = 0;                            // cannot hold it
    auto snap_hit = [&](int64_t k) -> bool {  // one vector: W2 bf16 bits or W floats
      if constexpr (Raw) return step_first(reinterpret_cast<const src_t*>(snaps->v) + k * W2,
                                           false) >= 0;
      else return (V::loadu(snaps->v + k * W) == vcm).zero_mask() != kNoHit;
    };
    while (j < snaps->count && !snap_hit(j)) ++j;
    i = std::min(j * kSnapSteps * W2, n / W2 * W2);
  }
  int f = -1;
  while (i + W2 <= n && (f = step_first(z + i, i < split_end)) < 0) i += W2;
  if (by_mask && i + W2 <= n) return i + f;
  if (i < split_end) {
    int64_t first = W2;
    for (int64_t q = 0; q < W2; ++q) {
      const acc_t v = static_cast<acc_t>(z[i + q]);
      if (nan ? v != v : v == cm) first = std::min(first, split_class(q));
    }
    return i + first;
  }
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(z[i]);
    if (nan ? v != v : v == cm) return i;
  }
  return -1;
}

}  // namespace nllfused_cpu::NLLF_CPU_NS
