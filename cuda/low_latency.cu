// Low-latency (decode) dispatch / combine kernels (protocol in low_latency.cuh, memory in
// low_latency_layout.cuh; the design and its measurements in docs/low_latency.md).
//
// Dispatch send: a block takes its tokens two at a time (their rows copied into shared memory in one round); warp i
// finds token i's distinct experts and their owner ranks; every thread casts its pieces of each bf16 row to fp8 once
// if asked (the exact recipe of jax_ep.fp8) and stores them, with a header {token, its K expert ids}, once into each
// owner on another GPU, at slot t of that owner's staging area for this source, and once for all the owners on this
// GPU, at slot t of this rank's own area for itself, where they read it (the token index: a block needs no view of the
// other tokens; one row serves all of an owner's experts the token named), and sets bit t of the owner's presence bits
// for each (expert, me). Signals are counters: on one GPU each block adds its share to every rank's as its stores
// finish; with a rank on another GPU the last block to finish adds the op's whole unit.
// Dispatch receive: blocks stride over (local expert, source rank) pairs, wait for every source's signal, count
// each source's rows off its presence bits, and copy the pair's rows in token order -- from the source's area for
// itself when it is on this GPU, else from this rank's area for it -- to offset sum_{s' < s} count(s') of the
// expert's output rows (the header gives each row's k for this expert).
// Combine mirrors it: the owner writes each answer to another rank's token into that rank's slot
// [token][k]; the source sums w[t, k] * y in f32 in ascending k (the reference's order), reading its own
// tokens' answers straight from y.

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/fast_divmod.cuh"
#include "cuda/low_latency.cuh"
#include "cuda/sync.cuh"

namespace jax_ep {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// The dispatch kernels are built to fit five blocks per SM (48 registers, a few dozen bytes spilled): at 64
// registers four blocks filled an SM's register file exactly, so a block of another rank's kernel left on the
// SM (ranks share SMs under MPS) pushed the grid, sized at four blocks per SM, into a second wave. Measured on
// the H200 (medians over rounds): the receive's last block started 7.5 us (R=2) and 39 us (R=8) after its
// first, the R=8 send's 21.5 us; at five blocks per SM 0.1-0.4 us (R=8 p90 still 22-37 us for the receive).
constexpr int kDispatchBlocksPerSm = 5;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kFp8Max = 448.f;
constexpr float kAmaxFloor = 1e-4f;     // jax_ep.fp8.AMAX_FLOOR
constexpr uint32_t kFp8MaxInvBits = 0x3b124925u;  // float32(1 / 448), as jax_ep.fp8._FP8_MAX_INV
constexpr uint8_t kUe8m0One = 127;      // padding byte of a packed UE8M0 word (jax_ep.fp8)
// The thread that checks the buffer is open (trap_if_closed): its warp waits for that load, and warp 5 has no early
// job in any kernel here (thread 0 had: the receives' first signal, the combine's token setup, the send's routing).
constexpr unsigned kLivenessChecker = 160;

enum Kernel : int { kDispatchSendKernel = 0, kDispatchRecvKernel = 1, kCombineSendKernel = 2, kCombineRecvKernel = 3 };

__device__ __forceinline__ uint64_t ticket_epoch(const uint32_t* ticket) {
  return static_cast<uint64_t>(ticket[0]) | (static_cast<uint64_t>(ticket[1]) << 32);
}

__device__ __forceinline__ int sanitize(int id, int num_experts) { return id >= 0 && id < num_experts ? id : -1; }

// True in every thread of the block that finishes last; its signals (system-scope releases) then cover every other
// block's memory operations too. The counter is left at zero for the next op.
// The counter is a GPU-scope release / acquire: every block is on this GPU, and the PTX memory model's release is
// cumulative, so the last block's system-scope signal orders whatever the other blocks did before counting for any
// peer that acquires it -- a send's row stores (when a rank is on another GPU), a receive's loads of
// peer-written staging and the dispatch receive's clearing of the presence bits. A system-scope fence in every
// block instead waited for that block's stores to drain at system scope: measured on the H200, 1-2 us more per
// receive op (3a96f16) and 0.4-0.8 us per send at R=2, 1.5-2.5 us at R=8 (docs/low_latency.md, tenth session).
// Do not weaken it below GPU scope.
// No thread fences before the barrier: the barrier orders every thread's operations before thread 0's fence in the PTX
// model's causality order, and the fence-then-count release pattern is cumulative over them (a fence in every thread
// as well cost one more memory-barrier round per block; nineteenth session).
__device__ bool last_block_to_finish(unsigned* counter) {
  __shared__ bool s_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    fence_acq_rel_gpu();  // the release pattern: the barrier brings the other threads' operations before it
    s_last = atomicAdd(counter, 1u) == gridDim.x - 1;
    if (s_last) {
      *counter = 0;
      fence_acq_rel_gpu();
    }
  }
  __syncthreads();
  return s_last;
}

// Kernel-side timing (block 0's start to the last block's end), accumulated in device memory and read
// by benchmarks through the runtime: the only clock that excludes launch and host overhead under MPS. The
// timeline keeps each kernel's last kLowLatencyTimelineSlots ops (start, latest block start, mid, end): every process on
// one GPU reads the same %globaltimer, so the benchmark can line the ranks up.
__device__ __forceinline__ uint64_t* timeline_entry(const PeerView& v, int kernel, uint64_t epoch) {
  return field<uint64_t>(v.local, v.ll.timing) + kLowLatencyTimelineWord +
         ((epoch % kLowLatencyTimelineSlots) * kLowLatencyKernels + kernel) * kLowLatencyTimelineEntry;
}

// Every block: block 0 stamps the kernel's start, every block raises the entry's latest block start (an older
// op's value in the slot is always earlier, so no reset is needed). `now`: the block's first instruction (read
// before any load; written once the epoch says where). Only a receive's last block reads the start word; a send's
// time comes from its timeline entry (add_send_time).
__device__ __forceinline__ void stamp_start(const PeerView& v, int kernel, uint64_t epoch, uint64_t now) {
  if (threadIdx.x != 0) return;
  uint64_t* entry = timeline_entry(v, kernel, epoch);
  if (blockIdx.x == 0) {
    if (kernel == kDispatchRecvKernel || kernel == kCombineRecvKernel) field<uint64_t>(v.local, v.ll.timing)[kernel] = now;
    entry[0] = now;
  }
  atomicMax(reinterpret_cast<unsigned long long*>(entry + 1), static_cast<unsigned long long>(now));
}

__device__ __forceinline__ void stamp_end(const PeerView& v, int kernel, uint64_t epoch) {  // the last block only
  if (threadIdx.x == 0) {
    uint64_t* t = field<uint64_t>(v.local, v.ll.timing);
    const uint64_t now = global_timer_ns(), start = ld_peer_written(t + kernel);
    t[kLowLatencyKernels + 2 * kernel] += now > start ? now - start : 0;
    t[kLowLatencyKernels + 2 * kernel + 1] += 1;
    timeline_entry(v, kernel, epoch)[3] = now;
  }
}

// A send block, after its signals (thread 0): raises the op's latest arrival at the finish (mid: before the fence) and
// its end (older ops' values in the slot are earlier). A send has no last block, so its kernel time is added to the
// sums by its receive's last block (add_send_time), from these stamps.
__device__ __forceinline__ void stamp_send_end(const PeerView& v, int kernel, uint64_t epoch, uint64_t arrived) {
  auto* entry = reinterpret_cast<unsigned long long*>(timeline_entry(v, kernel, epoch));
  atomicMax(entry + 2, static_cast<unsigned long long>(arrived));
  atomicMax(entry + 3, static_cast<unsigned long long>(global_timer_ns()));
}

__device__ __forceinline__ void add_send_time(const PeerView& v, int send_kernel, uint64_t epoch) {  // the last block
  if (threadIdx.x != 0) return;
  const uint64_t* entry = timeline_entry(v, send_kernel, epoch);
  const uint64_t start = ld_peer_written(entry), end = ld_peer_written(entry + 3);
  uint64_t* t = field<uint64_t>(v.local, v.ll.timing);
  t[kLowLatencyKernels + 2 * send_kernel] += end > start ? end - start : 0;
  t[kLowLatencyKernels + 2 * send_kernel + 1] += 1;
}

// Receive kernels: how much of the kernel's time went to waiting for peers. Every block stamps the moment its
// waits were satisfied (the latest one wins); the last block adds latest - start to the kernel's wait sum.
// Receive kernel k (dispatch 0, combine 1) uses the words after the per-kernel sums.
__device__ __forceinline__ uint64_t* wait_words(const PeerView& v) {
  return field<uint64_t>(v.local, v.ll.timing) + 3 * kLowLatencyKernels;
}

__device__ __forceinline__ void stamp_wait_end(const PeerView& v, int recv_kernel) {  // thread 0 of each block
  atomicMax(reinterpret_cast<unsigned long long*>(wait_words(v) + recv_kernel),
            static_cast<unsigned long long>(global_timer_ns()));
}

__device__ __forceinline__ void add_wait_time(const PeerView& v, int recv_kernel, int kernel, uint64_t epoch) {
  if (threadIdx.x == 0) {  // the last block
    uint64_t* w = wait_words(v);
    const uint64_t end = ld_peer_written(w + recv_kernel);
    const uint64_t start = ld_peer_written(field<uint64_t>(v.local, v.ll.timing) + kernel);
    w[2 + 2 * recv_kernel] += end > start ? end - start : 0;
    w[2 + 2 * recv_kernel + 1] += 1;
    w[recv_kernel] = 0;
    timeline_entry(v, kernel, epoch)[2] = end;
  }
}

// A sender of epoch n writes parity n & 1: the destination must have received epoch n - 2 from it (for the dispatch
// every rank: the ranks on this GPU read this rank's area for itself). If this rank itself has not, the caller holds
// more than two results: that can never complete, so fail now.
// `own_seen` / `dest_seen`: this rank's and dest's "done" flags, loaded (acquire) before the epoch was known so
// that the two loads' latencies overlap; they are loaded again only when too old.
__device__ void wait_staging_free(const PeerView& v, size_t done_offset, uint64_t epoch, int dest, int phase,
                                  uint64_t own_seen, uint64_t dest_seen) {
  if (epoch < 3) return;
  const uint64_t* done = field<uint64_t>(v.local, done_offset);
  if (own_seen < epoch - 2 && ld_acquire_sys(done + v.rank) < epoch - 2) {
    report_failure(v, v.rank, kPhaseLowLatencyTooMany);
    __trap();
  }
  if (dest_seen < epoch - 2) wait_flag_geq(v, done + dest, epoch - 2, dest, phase);
}

// The "done" flags wait_staging_free needs, for destination `dest`. One acquire, issued last: an acquire load holds
// back the loads after it until it returns, so two would cost two rounds. The own flag needs none: this rank's own
// receive kernel, earlier in the stream, raised it, and a value too old is loaded again (acquire) before failing.
struct DoneSeen {
  uint64_t own = 0, dest = 0;
};

__device__ __forceinline__ DoneSeen load_done_flags(const PeerView& v, size_t done_offset, int dest) {
  const uint64_t* done = field<uint64_t>(v.local, done_offset);
  DoneSeen seen;
  seen.own = ld_peer_written(done + v.rank);
  seen.dest = ld_acquire_sys(done + dest);
  return seen;
}

// A warp copies one chunk of a row: up to kChunkBytes (32 lanes x 4 x 16 B), every load in flight before
// the stores (load and store are separate so that other loads can join the round). Rows are split into
// chunks so that several warps share a row: the kernels are latency-bound at decode sizes, and short
// per-warp chains are what keeps them fast.
constexpr int kChunkVecs = 32 * 4;
constexpr int kChunkBytes = kChunkVecs * 16;

// Item i = j * chunks + chunk of a copy loop (row j, its 2 KB chunk), stepped by `by` with no division by the run-time
// chunk count (fast_divmod.cuh says what those cost).
__device__ __forceinline__ void step_row_chunk(int& j, int& chunk, int by, int chunks) {
  for (chunk += by; chunk >= chunks; chunk -= chunks) ++j;
}

template <bool kPeerWrittenSource>
__device__ __forceinline__ void warp_load_chunk(const uint8_t* src, int bytes, int chunk, int4 v[4]) {
  const int n = bytes / 16, j0 = chunk * kChunkVecs + (threadIdx.x & 31);
  const int4* in = reinterpret_cast<const int4*>(src);
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int j = j0 + 32 * u;
    v[u] = j < n ? (kPeerWrittenSource ? ld_peer_written(in + j) : ld_read_once(in + j)) : make_int4(0, 0, 0, 0);
  }
}

__device__ __forceinline__ void warp_store_chunk(uint8_t* dst, int bytes, int chunk, const int4 v[4]) {
  const int n = bytes / 16, j0 = chunk * kChunkVecs + (threadIdx.x & 31);
  int4* out = reinterpret_cast<int4*>(dst);
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int j = j0 + 32 * u;
    if (j < n) out[j] = v[u];
  }
}

__device__ __forceinline__ void warp_copy4_peer_written(const uint8_t* src, uint8_t* dst, int bytes) {
  const int lane = threadIdx.x & 31;
  for (int j = lane; j < bytes / 4; j += 32) {
    reinterpret_cast<int*>(dst)[j] = ld_peer_written(reinterpret_cast<const int*>(src) + j);
  }
}

__device__ __forceinline__ float ceil_pow2(float s) {  // jax_ep.fp8._ceil_pow2, on the bits
  if (!isfinite(s)) return s;
  const uint32_t bits = __float_as_uint(s);
  return __uint_as_float((bits & 0x7f800000u) + ((bits & 0x007fffffu) ? (1u << 23) : 0u));
}

__device__ __forceinline__ void unpack_bf16x8(const int4& raw, float f[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p = __bfloat1622float2(h[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

// fp8 of 8 channels owned by one lane; a half-warp (16 lanes) owns one 128-channel group. Returns the
// group's scale_inv (identical in the 16 lanes) and the 8 e4m3 bytes. The exact recipe of jax_ep.fp8.
__device__ __forceinline__ float cast8_fp8(const int4& raw, bool round_scale, uint2* q8) {
  float f[8];
  unpack_bf16x8(raw, f);
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(f[i]));
#pragma unroll
  for (int off = 8; off >= 1; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, off));
  float scale_inv = __fmul_rn(fmaxf(amax, kAmaxFloor), __uint_as_float(kFp8MaxInvBits));
  if (round_scale) scale_inv = ceil_pow2(scale_inv);
  const float scale = __fdiv_rn(1.f, scale_inv);
  uint32_t packed[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    uint32_t word = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float q = fminf(fmaxf(__fmul_rn(f[4 * h + i], scale), -kFp8Max), kFp8Max);
      word |= static_cast<uint32_t>(__nv_cvt_float_to_fp8(q, __NV_SATFINITE, __NV_E4M3)) << (8 * i);
    }
    packed[h] = word;
  }
  *q8 = make_uint2(packed[0], packed[1]);
  return scale_inv;
}

// A receive of epoch n must follow the receive of n - 1 (this rank's own "done" flag, which that receive's last
// block raised, earlier in the stream): a receive run ahead of an earlier pending result would let a later send
// reuse that result's staging before it is read. Block 0's thread 0 fails the call otherwise; it loads the flag
// before its acquire of a signal (which would hold the load back a round).
__device__ __forceinline__ uint64_t load_received(const PeerView& v, size_t done_offset) {
  return blockIdx.x == 0 && threadIdx.x == 0 ? ld_peer_written(field<uint64_t>(v.local, done_offset) + v.rank) : 0;
}

__device__ __forceinline__ void check_receive_order(const PeerView& v, uint64_t received, uint64_t epoch) {
  if (blockIdx.x == 0 && threadIdx.x == 0 && received + 1 != epoch) {
    report_failure(v, v.rank, kPhaseLowLatencyOutOfOrder);
    __trap();
  }
}

// A send signals rank r by adding to r's counter for this rank: kOpUnit per op in all. Every block of an op adds its
// share -- block 0's kOpUnit - (gridDim.x - 1), every other block's 1, so an op adds exactly kOpUnit whatever its grid
// and no partial sum reaches the next multiple -- to the kernel's launch counter at its start: the op's epoch is the
// number of whole ops before it, plus one, and no block has to be the last to publish it. When every rank is on this
// GPU, each block also adds its share to every rank's counter once its stores are done, with a GPU-scope release
// (those ranks' threads run on this device, whichever process launched them). Otherwise the last block to finish adds
// kOpUnit with a system-scope release, which is cumulative over the blocks it counted: one in every block waited for
// that block's stores to drain across NVLink.
// Measured on the H200 (medians; benchmarks/results/2026-11-30_h200x2_session16.json). One GPU, the session's runs of
// each (R=2: 9 of the previous scheme, 8 of this; R=8: 7 and 7): spans from send start to receive end at R=2
// 24.0-25.5 -> 22.2-22.5 us (dispatch) and 27.9-29.5 -> 25.8-27.0 (combine), at R=8 52.4-53.7 -> 51.7-52.8 and
// 107.0-108.4 -> 104.4-106.2. There the last block of every send signalled, an atomic round after the others, and
// released at system scope after the send's end stamp: the stamp left that out, the gap before the receive did not.
// Two GPUs (R=2): spans unchanged (20.3-20.5 / 35.0-35.1 us); blocks signalling their own GPU's ranks before the last
// block signals the other's (a fence, a barrier and a release more on its way) made them 0.7-1.0 us longer, every
// block signalling the other GPU's rank at system scope 0.8 (dispatch) and 2.4 (combine).
constexpr uint64_t kOpUnit = 1ull << 20;  // more than any grid (the launchers check)

__device__ __forceinline__ uint64_t op_share() { return blockIdx.x == 0 ? kOpUnit - (gridDim.x - 1) : 1ull; }

// This op's epoch, taken by one thread of every block: a load, then the block's share added with no value returned.
// The load cannot see this block's own share (same thread, same address, program order), so the op's partial sum stays
// under kOpUnit and the quotient counts only the ops before it (which finished: earlier kernels of the stream). Until the
// nineteenth session every block waited for an atomic's returned sum on that one address instead (docs/low_latency.md).
__device__ __forceinline__ uint64_t take_op_epoch(uint64_t* launches) {
  const uint64_t before = ld_relaxed_gpu(launches);
  red_relaxed_gpu_add(launches, op_share());
  return before / kOpUnit + 1;
}

// A send block done with its stores signals as above (threads r < R, rank r): a barrier, then thread r's GPU-scope
// release, which covers the whole block's stores (the barrier orders them before it; a release is cumulative). Then it
// stamps the op's timeline (latest arrival, latest signal) and, in block 0, writes the ticket. Rank r's base pointer is
// loaded before the barrier (or the last-block count), so its round trip overlaps the other warps' last stores instead
// of following them (with a rank on another GPU, R=2 over two H200s: sends 0.1-0.3 us shorter, twentieth session).
__device__ void finish_send_block(const PeerView& v, uint32_t* ticket, int kernel, size_t signal_offset,
                                  uint64_t epoch, uint64_t arrived) {
  const int R = v.ll.num_ranks, r = threadIdx.x;
  uint64_t* const signal = r < R ? field<uint64_t>(v.peers[r], signal_offset) + v.rank : nullptr;
  if (v.every_rank_on_this_gpu()) {
    __syncthreads();
    if (r < R) red_release_gpu_add(signal, op_share());
  } else if (last_block_to_finish(field<unsigned>(v.local, v.ll.counters) + kernel)) {
    if (r < R) red_release_sys_add(signal, kOpUnit);
  }
  if (threadIdx.x == 0) {
    stamp_send_end(v, kernel, epoch, arrived);
    if (blockIdx.x == 0) {
      ticket[0] = static_cast<uint32_t>(epoch);
      ticket[1] = static_cast<uint32_t>(epoch >> 32);
    }
  }
}

// A receive's last block raises this rank's "done" flag at every peer: thread 32 + r at rank r, so warp 0's timing
// bookkeeping (thread 0: dependent loads) runs beside it instead of ahead of it. Every block loads the flag's address
// before the last-block count, whose fence its round trip then overlaps. Null for the other threads.
static_assert(kThreads >= 32 + kMaxPeers, "a receive block raises the done flags from threads 32..32 + R");
__device__ __forceinline__ uint64_t* done_flag_at_peer(const PeerView& v, size_t done_offset) {
  const int r = static_cast<int>(threadIdx.x) - 32;
  return r >= 0 && r < v.ll.num_ranks ? field<uint64_t>(v.peers[r], done_offset) + v.rank : nullptr;
}

// Every receive block's end: the last block raises the done flags (above), stamps the kernel's end and adds the
// receive's, its wait's and its send's times to the sums (wait_index: dispatch 0, combine 1).
__device__ __forceinline__ void finish_receive_block(const PeerView& v, int recv_kernel, int wait_index, int send_kernel,
                                                     size_t done_offset, uint64_t epoch) {
  uint64_t* const done = done_flag_at_peer(v, done_offset);
  if (last_block_to_finish(field<unsigned>(v.local, v.ll.counters) + recv_kernel)) {
    if (done != nullptr) st_release_sys(done, epoch);
    stamp_end(v, recv_kernel, epoch);
    add_wait_time(v, wait_index, recv_kernel, epoch);
    add_send_time(v, send_kernel, epoch);
  }
}

// Receive kernels: wait until every rank's counter for this rank has reached epoch * kOpUnit, before a
// __syncthreads. Threads r < R each load one word (one acquire: the common case, a signal already raised, costs one
// round). The ranks kernels wait for are at most kMaxPeers, so threads from kMaxPeers on never wait here.
__device__ __forceinline__ void wait_for_signals(const PeerView& v, const uint64_t* counters, uint64_t epoch, int phase) {
  const int r = threadIdx.x;
  if (r >= v.ll.num_ranks) return;
  const uint64_t target = epoch * kOpUnit;
  if (ld_acquire_sys(counters + r) < target) wait_flag_geq(v, counters + r, target, r, phase);
}

// -- dispatch ---------------------------------------------------------------------------------------------

// A dispatch send block takes its tokens kSendTokensPerPass at a time: their bf16 rows are copied into shared
// memory asynchronously (cp.async: no registers held) while warp i finds token i's owners, so a block's tokens cost
// one load round, not one each (at R=8 a block of the 16-SM grid has two of the 128 tokens).
constexpr int kSendTokensPerPass = 2;
constexpr size_t kSendPassSmemCap = 64 * 1024;  // past it (H > 16384) one token per pass: occupancy over rounds
// Where the grid budget has room for it (R=2: 2 x 128 tokens within 330 blocks), a token's row is split over this many
// blocks: each block's chain of casts and stores is half as long. Measured on the H200 (medians, both GPUs): R=2
// dispatch send 10.5-10.6 -> 10.0-10.1 us, the op within noise (24.2-24.4 against 24.4-24.6); R=8 has no room.
constexpr int kSendRowParts = 2;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Where one token goes: filled by warp i for the pass's token i.
struct TokenDests {
  uint8_t* row[32];         // its staging rows: one per owner on another GPU, one here for all the owners on this GPU
  uint32_t* bits[32];       // the owners' presence-bit words (one per named expert)
  int ids[32];              // the token's expert ids (sanitized), for the header
  int num_rows, num_bits;
};

// Word w of a staged row's header {t, the token's K expert ids, -1 padding}.
__device__ __forceinline__ int header_word(const TokenDests& d, int t, int w, int K) {
  return w == 0 ? t : (w <= K ? d.ids[w - 1] : -1);
}

// Warp-wide (lane k holds the token's k-th id): the distinct owner ranks and named experts of token t. An owner on
// another GPU gets the row in its staging (slot t of its area for this source); the owners on this GPU read it from
// slot t of this rank's area for itself, written once for all of them: on one GPU the ranks share its memory, and a
// row written into each owner's area multiplied the bytes every op moves through it (R=8: ~40 MB instead of ~7.6).
// kOneGpu: every rank is on this GPU (the launcher checks PeerView::same_gpu), so each token has that one row.
template <bool kOneGpu>
__device__ __forceinline__ void find_token_dests(const PeerView& v, int id, int t, size_t parity, size_t bits_copy,
                                                 TokenDests* d) {
  const LowLatencyLayout& l = v.ll;
  const int R = l.num_ranks, E_loc = l.local_experts_div.divisor, K = l.num_topk, T_max = l.max_tokens;
  const int W = low_latency_token_words(T_max), lane = threadIdx.x & 31, owner = id >= 0 ? l.local_experts_div.div(id) : -1;
  bool first = id >= 0, first_of_owner = id >= 0;  // an expert named twice counts once (its first k)
  for (int j = 0; j < K; ++j) {
    const int other = __shfl_sync(kFullMask, id, j);
    if (j < lane && other == id) first = false;
    if (!kOneGpu && j < lane && other >= 0 && l.local_experts_div.div(other) == owner) first_of_owner = false;
  }
  const unsigned named = __ballot_sync(kFullMask, first);
  if (first) {
    d->bits[__popc(named & ((1u << lane) - 1u))] =
        field<uint32_t>(v.peers[owner], l.dispatch_bits) + ((bits_copy * E_loc + (id - owner * E_loc)) * R + v.rank) * W + (t >> 5);
  }
  const bool same_gpu = kOneGpu || (owner >= 0 && ((v.same_gpu >> owner) & 1ull));
  const unsigned pushed = kOneGpu ? 0u : __ballot_sync(kFullMask, first_of_owner && !same_gpu);
  const bool any_same_gpu = kOneGpu ? named != 0 : __ballot_sync(kFullMask, first_of_owner && same_gpu) != 0;
  if (!kOneGpu && first_of_owner && !same_gpu) {
    d->row[__popc(pushed & ((1u << lane) - 1u))] =
        v.peers[owner] + l.dispatch_stage + ((parity * R + v.rank) * T_max + t) * static_cast<size_t>(l.row_stride);
  }
  d->ids[lane] = id;
  if (lane == 0) {
    int rows = __popc(pushed);
    if (any_same_gpu) {
      d->row[rows++] =
          v.local + l.dispatch_stage + ((parity * R + v.rank) * T_max + t) * static_cast<size_t>(l.row_stride);
    }
    d->num_rows = rows;
    d->num_bits = __popc(named);
  }
}

// kSplitRow: the R=2 build, a token's row over row_parts blocks. A separate build because the split's index arithmetic
// cost the unsplit send ~1 us at R=8 (22.4 -> 23.4 us, both GPUs) when row_parts was only a run-time value.
// kOneGpu: every rank on this GPU, one row per token. A separate build because the per-owner row list cost the send on
// one H200 3.5 us at R=8 (18.0-18.3 against 14.5-14.6) and 1.5-2 us at R=2 (9.9-10.4 against 8.4) with only that one
// row in it.
template <bool kSplitRow, bool kOneGpu>
__global__ void __launch_bounds__(kThreads, kDispatchBlocksPerSm) ll_dispatch_send_kernel(PeerView v, LowLatencyDispatchSendArgs a,
                                                                                          int tokens_per_pass, FastDivmod row_parts) {
  const uint64_t entry_ns = global_timer_ns();
  extern __shared__ int4 token_rows[];  // [tokens_per_pass][H / 8]: the pass's bf16 rows
  __shared__ TokenDests dests[kSendTokensPerPass];
  const LowLatencyLayout& l = v.ll;
  const int R = l.num_ranks, E = l.num_experts, K = l.num_topk, H = l.hidden, T = a.num_tokens;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, P = tokens_per_pass, row_vecs = H / 8;
  // Where the grid budget has room (R=2), a token's row is split over row_parts blocks (pieces [j_lo, j_hi), whole
  // 128-channel groups); part 0 also writes the header and the presence bits.
  const FastDivmod::QuotientRemainder block = kSplitRow ? row_parts.divmod(blockIdx.x)
                                                         : FastDivmod::QuotientRemainder{static_cast<int>(blockIdx.x), 0};
  const int token_block = block.quotient, part = block.remainder;
  const int step = kSplitRow ? row_parts.div(gridDim.x) : static_cast<int>(gridDim.x);
  const int unit_shift = row_vecs % 16 == 0 ? 4 : 0;  // split at whole 16-piece units (128-channel groups) when it can
  const int j_lo = kSplitRow ? row_parts.div((row_vecs >> unit_shift) * part) << unit_shift : 0;
  const int j_hi = kSplitRow ? row_parts.div((row_vecs >> unit_shift) * (part + 1)) << unit_shift : row_vecs;
  // Pass p takes tokens token_block + (p * P + i) * step, i < P (token_block = blockIdx.x / row_parts, step = grid /
  // row_parts). The first pass's rows and ids are requested before the epoch: nothing about them depends on the op.
  auto request_rows = [&](int first) {
    for (int i = 0; i < P; ++i) {
      const int t = first + i * step;
      if (t >= T) break;
      const int4* x = reinterpret_cast<const int4*>(static_cast<const uint8_t*>(a.x) + static_cast<size_t>(t) * H * 2);
      for (int j = j_lo + threadIdx.x; j < j_hi; j += kThreads) cp_async16(token_rows + i * row_vecs + j, x + j);
    }
    cp_async_commit();
  };
  auto load_id = [&](int first) {  // warp i < P, lane k < K: token i's k-th expert id
    const int t = first + warp * step;
    return warp < P && lane < K && t < T ? sanitize(a.topk_idx[t * K + lane], E) : -1;
  };
  int first = token_block;
  request_rows(first);
  int id = load_id(first);
  // The last warp checks that every rank has received epoch n - 2 (its acquire issued after the epoch's load, so both
  // are one round) while warps < P find their tokens' destinations: until then a rank may still read its area for
  // this rank, or this rank's area for itself (owners on this GPU), of parity n & 1; nothing is written before that
  // check.
  __shared__ uint64_t s_epoch;
  if (threadIdx.x == 0) s_epoch = take_op_epoch(field<uint64_t>(v.local, l.dispatch_epoch));
  DoneSeen seen;
  if (warp == kWarps - 1 && lane < R) seen = load_done_flags(v, l.dispatch_done, lane);
  trap_if_closed(v, kLivenessChecker);  // after the loads above: its branch holds its warp's later loads back
  __syncthreads();
  const uint64_t epoch = s_epoch;
  const size_t parity = epoch & 1, bits_copy = epoch % kLowLatencyBitsCopies;
  if (warp == kWarps - 1) {
    for (int r = lane; r < R; r += 32) {
      wait_staging_free(v, l.dispatch_done, epoch, r, kPhaseLowLatencyDispatchSend, r == lane ? seen.own : 0,
                        r == lane ? seen.dest : 0);
    }
  }

  // Per token: one staging row per owner rank on another GPU (slot t of the owner's area for this source) and one in
  // this rank's area for itself (slot t) for the owners on this GPU, one presence bit per named expert. After the
  // barrier -- nothing is written before the checks above: the receive of epoch n - 2 clears the bits this op sets and reads
  // the rows it rewrites -- every thread casts / copies its pieces of each row once and stores them to every row.
  const int payload_bytes = a.use_fp8 ? H : 2 * H, header_bytes = low_latency_header_bytes(K);
  const bool round_scale = a.round_scale || a.use_ue8m0;
  for (; first < T; first += P * step) {
    if (warp < P && first + warp * step < T) {
      find_token_dests<kOneGpu>(v, id, first + warp * step, parity, bits_copy, &dests[warp]);
    }
    __syncthreads();  // also orders every write below after the liveness check and the staging checks
    if (first == token_block) stamp_start(v, kDispatchSendKernel, epoch, entry_ns);
    int tokens = 0;  // the pass's tokens first + i * step < T, i < P (counted: a division by step is a MUFU chain)
    while (tokens < P && first + tokens * step < T) ++tokens;
    for (int i = 0; (!kSplitRow || part == 0) && i < tokens; ++i) {
      const int t = first + i * step;
      const TokenDests& d = dests[i];
      // The owner's receive finds expert e's rows by these bits. GPU scope suffices: only this rank writes the word.
      if (threadIdx.x < d.num_bits) atomicOr(d.bits[threadIdx.x], 1u << (t & 31));
      // The header {t, the token's K expert ids}: an owner's receive finds there the first k naming each expert.
      if (kOneGpu) {
        if (d.num_rows != 0 && threadIdx.x < header_bytes / 4) {
          const int w = threadIdx.x;
          reinterpret_cast<int*>(d.row[0])[w] = header_word(d, t, w, K);
        }
      } else {
        for (int r = 0; r < d.num_rows; ++r) {
          for (int w = threadIdx.x; w < header_bytes / 4; w += kThreads) {
            reinterpret_cast<int*>(d.row[r])[w] = header_word(d, t, w, K);
          }
        }
      }
    }
    cp_async_wait_all();  // this thread's pieces (each thread reads back only what it requested)
    for (int i = 0; i < tokens; ++i) {
      const TokenDests& d = dests[i];
      const int n = d.num_rows;
      if (kOneGpu && n == 0) continue;  // block-uniform: every thread reads the same shared entry
      uint8_t* const row0 = d.row[0];   // kOneGpu's only row, held in a register across the stores
      const int4* row_in = token_rows + i * row_vecs;
      // Piece j (16 bytes = 8 channels) of the row is thread (j - j_lo) % kThreads's; in fp8 a half-warp owns a
      // 128-channel group, and since H % 128 == 0 (and j_lo is a multiple of 16 pieces) a half-warp is wholly inside
      // the row or wholly past it.
      for (int j0 = j_lo + warp * 32; n > 0 && j0 < j_hi; j0 += kThreads) {
        const int j = j0 + lane;
        const bool active = j < j_hi;
        const int4 raw = active ? row_in[j] : make_int4(0, 0, 0, 0);
        if (a.use_fp8) {
          uint2 q;
          const float scale_inv = cast8_fp8(raw, round_scale, &q);
          if (!active) continue;
          const int g = j / 16;
          for (int r = 0; r < (kOneGpu ? 1 : n); ++r) {
            uint8_t* row = (kOneGpu ? row0 : d.row[r]) + header_bytes;
            *reinterpret_cast<uint2*>(row + j * 8) = q;
            if ((lane & 15) == 0) {
              if (a.use_ue8m0) {
                row[payload_bytes + g] = static_cast<uint8_t>((__float_as_uint(scale_inv) >> 23) & 0xff);
              } else {
                reinterpret_cast<float*>(row + payload_bytes)[g] = scale_inv;
              }
            }
          }
        } else if (active) {
          for (int r = 0; r < (kOneGpu ? 1 : n); ++r) {
            reinterpret_cast<int4*>((kOneGpu ? row0 : d.row[r]) + header_bytes)[j] = raw;
          }
        }
      }
      if ((!kSplitRow || part == 0) && n > 0 && a.use_fp8 && a.use_ue8m0 && threadIdx.x < n) {  // the packed word's unused bytes (2^0)
        const int groups = H / 128;
        uint8_t* scales = d.row[threadIdx.x] + header_bytes + payload_bytes;
        for (int g = groups; g < (groups + 3) / 4 * 4; ++g) scales[g] = kUe8m0One;
      }
    }
    __syncthreads();  // dests and token_rows are rewritten for the next pass
    if (first + P * step < T) {
      request_rows(first + P * step);
      id = load_id(first + P * step);
    }
  }
  if (token_block >= T) {  // no token (T = 0: one block still signals)
    __syncthreads();
    stamp_start(v, kDispatchSendKernel, epoch, entry_ns);
  }

  finish_send_block(v, a.ticket, kDispatchSendKernel, l.dispatch_signal, epoch, global_timer_ns());
}

// The first k whose id in a staged row's header {t, ids[K]} is `expert` (-1 if none), from the header's 16-byte units
// as lanes < units loaded them (every lane of the warp calls).
__device__ __forceinline__ int first_k_naming(const int4& unit, int lane, int units, int K, int expert) {
  int k = K;
  if (lane < units) {
    const int word[4] = {unit.x, unit.y, unit.z, unit.w};
#pragma unroll
    for (int c = 3; c >= 0; --c) {
      const int i = 4 * lane + c;  // header word i: ids[i - 1]
      if (i >= 1 && i <= K && word[c] == expert) k = i - 1;
    }
  }
  k = __reduce_min_sync(kFullMask, k);
  return k < K ? k : -1;
}

// Blocks stride over (local expert e, source rank s) pairs (one pair per block unless the grid budget is
// smaller than E). Source s's rows for e sit at their token's slot; its presence bits say which, and row j of
// the output is the j-th of them (token order).
__global__ void __launch_bounds__(kThreads, kDispatchBlocksPerSm) ll_dispatch_recv_kernel(PeerView v, LowLatencyDispatchRecvArgs a) {
  const uint64_t entry_ns = global_timer_ns();
  // Dynamic shared memory: the block's (expert, source) pair's presence bits [W], then its rows' slots [T_max].
  extern __shared__ uint32_t pair_bits[];
  __shared__ int rows_from[kMaxPeers];
  const LowLatencyLayout& l = v.ll;
  const int R = l.num_ranks, E_loc = l.local_experts_div.divisor, H = l.hidden, T_max = l.max_tokens, S = R * T_max;
  const int W = low_latency_token_words(T_max);
  uint16_t* const slot_of_row = reinterpret_cast<uint16_t*>(pair_bits + W);
  const uint64_t epoch = ticket_epoch(a.ticket);
  const size_t parity = epoch & 1;
  const uint64_t received = load_received(v, l.dispatch_done);
  wait_for_signals(v, field<uint64_t>(v.local, l.dispatch_signal), epoch, kPhaseLowLatencyDispatchRecv);
  trap_if_closed(v, kLivenessChecker);
  check_receive_order(v, received, epoch);
  __syncthreads();  // every source's rows are there (the barrier orders the waiting threads' acquires before all)
  stamp_start(v, kDispatchRecvKernel, epoch, entry_ns);  // every write after the liveness check
  for (int pair = blockIdx.x; pair < E_loc * R; pair += gridDim.x) {
  const int e = l.ranks_div.div(pair), s = pair - e * R;  // not divmod's binding: it compiled to other code here
  // This op's copy of expert e's presence bits [R][W], and the copy the sends of epoch n + 2 will set.
  uint32_t* const bits_now = field<uint32_t>(v.local, l.dispatch_bits) + ((epoch % kLowLatencyBitsCopies) * E_loc + e) * R * W;
  uint32_t* const bits_next = field<uint32_t>(v.local, l.dispatch_bits) + (((epoch + 2) % kLowLatencyBitsCopies) * E_loc + e) * R * W;
  if (threadIdx.x < R) {
    const int r = threadIdx.x;
    // Four words' loads in flight before any shared-memory store: the compiler may not move a load of a generic
    // pointer past a store to shared memory (it could alias), which made each word a dependent round.
    int rows = 0;
    for (int w0 = 0; w0 < W; w0 += 4) {
      uint32_t word[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) word[u] = w0 + u < W ? ld_peer_written(bits_now + r * W + w0 + u) : 0u;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        rows += __popc(word[u]);
        if (r == s && w0 + u < W) pair_bits[w0 + u] = word[u];
      }
    }
    rows_from[r] = min(rows, T_max);
  }
  // The copy the sends of epoch n + 2 will set is cleared now (this op's copy is still read by other blocks); those
  // senders wait for this receive's "done" flag, raised after every block's stores.
  for (int w = threadIdx.x; w < W; w += blockDim.x) bits_next[s * W + w] = 0;
  __syncthreads();
  if (threadIdx.x == 0 && pair == static_cast<int>(blockIdx.x)) stamp_wait_end(v, 0);
  for (int t = threadIdx.x; t < T_max; t += blockDim.x) {  // row j of the pair is its j-th present token
    const uint32_t word = pair_bits[t >> 5];
    if ((word >> (t & 31)) & 1u) {
      int j = __popc(word & ((1u << (t & 31)) - 1u));
      for (int w = 0; w < (t >> 5); ++w) j += __popc(pair_bits[w]);
      slot_of_row[j] = static_cast<uint16_t>(t);
    }
  }
  if (s == v.rank) {  // the combine's receive finds this rank's own tokens' answers by these bits
    for (int w = threadIdx.x; w < W; w += blockDim.x) a.out_own_bits[e * W + w] = pair_bits[w];
  }
  int offset = 0, total = 0;
  for (int r = 0; r < R; ++r) {
    if (r < s) offset += rows_from[r];
    total += rows_from[r];
  }
  const int rows = rows_from[s];
  __syncthreads();  // slot_of_row
  const int payload_bytes = a.use_fp8 ? H : 2 * H;
  const int scale_bytes = a.use_fp8 ? 4 * low_latency_scale_words(H, a.use_ue8m0) : 0;
  // Source s's rows (one per token, shared by every expert of this rank the token named): in s's area for itself when
  // s is on this GPU, else where s wrote them, in this rank's area for s. The area's first row index is 32-bit: as a
  // 64-bit product it left the kernel spilling at its 48-register cap (124 B of spill loads, some in the row-copy
  // loop); in e70c193's push receive this change alone took the R=8 receive after its wait from 37.8-38.9 to
  // 34.4-34.6 us (the dispatch 71.1-72.3 -> 67.1-67.9; session 14).
  const int area_row = (static_cast<int>(parity) * R + s) * T_max;
  const uint8_t* stage = ((v.same_gpu >> s) & 1ull ? v.peers[s] : v.local) + l.dispatch_stage +
                         static_cast<size_t>(area_row) * l.row_stride;
  // A row's first chunk also carries its header (lanes < header units) and scales (the next lanes, 16- or 4-byte
  // units), loaded in the same round as the payload: a row costs one dependent load round, not three.
  const int header_bytes = low_latency_header_bytes(l.num_topk), header_units = header_bytes / 16;
  const int expert = v.rank * E_loc + e;  // the id the header names this expert by
  const bool wide_scales = scale_bytes % 16 == 0;
  const int scale_units = wide_scales ? scale_bytes >> 4 : scale_bytes >> 2;
  const int units_with_payload = header_units + scale_units <= 32 ? scale_units : 0;  // larger: copied after the payload
  const int lane = threadIdx.x & 31, chunks = ceil_div(payload_bytes, kChunkBytes);
  int j = 0, chunk = 0;
  for (step_row_chunk(j, chunk, threadIdx.x >> 5, chunks); j < rows; step_row_chunk(j, chunk, kWarps, chunks)) {
    const uint8_t* row = stage + static_cast<size_t>(slot_of_row[j]) * l.row_stride;
    const uint8_t* scales_in = row + header_bytes + payload_bytes;
    const size_t out_row = static_cast<size_t>(e) * S + offset + j;
    int4 payload[4], extra = make_int4(0, 0, 0, 0);
    warp_load_chunk<true>(row + header_bytes, payload_bytes, chunk, payload);
    if (chunk == 0 && lane < header_units + units_with_payload) {
      if (lane < header_units) {
        extra = ld_peer_written(reinterpret_cast<const int4*>(row) + lane);
      } else if (wide_scales) {
        extra = ld_peer_written(reinterpret_cast<const int4*>(scales_in) + lane - header_units);
      } else {
        extra.x = ld_peer_written(reinterpret_cast<const int*>(scales_in) + lane - header_units);
      }
    }
    warp_store_chunk(static_cast<uint8_t*>(a.out_x) + out_row * payload_bytes, payload_bytes, chunk, payload);
    if (chunk == 0) {
      uint8_t* scales_out = static_cast<uint8_t*>(a.out_scales) + out_row * scale_bytes;
      const int k = first_k_naming(extra, lane, header_units, l.num_topk, expert);
      if (lane == 0) {
        a.out_src_info[out_row] = extra.x;
        a.out_recv_k[out_row] = k;
      } else if (lane >= header_units && lane < header_units + units_with_payload) {
        if (wide_scales) {
          reinterpret_cast<int4*>(scales_out)[lane - header_units] = extra;
        } else {
          reinterpret_cast<int*>(scales_out)[lane - header_units] = extra.x;
        }
      }
      if (scale_bytes && units_with_payload == 0) warp_copy4_peer_written(scales_in, scales_out, scale_bytes);
    }
  }
  if (s == 0) {
    if (threadIdx.x == 0) a.out_count[e] = total;
    if (threadIdx.x < R) a.out_layout_range[e * R + threadIdx.x] = rows_from[threadIdx.x];
    for (int i = total + threadIdx.x; i < S; i += blockDim.x) {
      a.out_src_info[static_cast<size_t>(e) * S + i] = -1;
      a.out_recv_k[static_cast<size_t>(e) * S + i] = -1;
    }
  }
  __syncthreads();  // rows_from, pair_bits and slot_of_row are rewritten for the next pair
  }
  finish_receive_block(v, kDispatchRecvKernel, 0, kDispatchSendKernel, l.dispatch_done, epoch);
}

// -- combine ----------------------------------------------------------------------------------------------

// A unit of the combine send: rows [first, first + mine) of local expert e's rows from one source, to be written at
// `to`, that source's base pointer.
struct CombineUnit {
  int e = 0, offset = 0, first = 0, mine = 0;
  uint8_t* to = nullptr;
};

// A unit's layout ranges (sources 0..s of its expert) and its destination's base pointer are requested before any of
// them is used, so that a block's prologue issues them with its other loads (the epoch, the "done" flags, the liveness
// word) and waits one load round for all. Until the twenty-first session the ranges were added up as they came (a loop):
// the sources before s, then s, then the epoch were dependent rounds (three at rank 0 of R=2, two at rank 1), and each
// warp's first store waited for a load of v.peers[s] issued only after its y chunk had arrived. R=2 on one H200, five
// runs each in the same calls: combine send 10.6-11.6 against 11.6-12.1 us, without the other rank's copies 9.15-9.33
// against 9.47-9.58, with no rows 4.13-4.16 against 4.26-4.35.
constexpr int kUnitRangesInFlight = 8;  // sources requested at once; a unit of source s >= 8 loads the rest in a loop
struct UnitRequest {
  int e = 0, s = 0, part = 0;
  int ranges[kUnitRangesInFlight] = {};
  uint8_t* to = nullptr;
};

// The combine send's grid, worked out on the host: its prologue then needs no division by a runtime value (four such
// divisions in a chain, each ~20 instructions around a MUFU reciprocal, came before its first load).
struct CombineSendGrid {
  int pairs = 0;         // (local expert, source rank != me) pairs
  FastDivmod splits;     // blocks per pair
  FastDivmod others;     // R - 1
};

__device__ __forceinline__ UnitRequest request_unit(const PeerView& v, const LowLatencyCombineSendArgs& a,
                                                    const CombineSendGrid& g, int unit) {
  const int R = v.ll.num_ranks;
  const auto [pair, part] = g.splits.divmod(unit);
  const auto [e, other] = g.others.divmod(pair);
  UnitRequest q;
  q.part = part;
  q.e = e;
  q.s = other + (other >= v.rank ? 1 : 0);
#pragma unroll
  for (int r = 0; r < kUnitRangesInFlight; ++r) {
    if (r <= q.s) q.ranges[r] = a.layout_range[q.e * R + r];
  }
  q.to = v.peers[q.s];
  return q;
}

__device__ __forceinline__ CombineUnit settle_unit(const PeerView& v, const LowLatencyCombineSendArgs& a,
                                                   const CombineSendGrid& g, const UnitRequest& q) {
  const int R = v.ll.num_ranks, T_max = v.ll.max_tokens, S = R * T_max;
  // The handle is user-visible data: clamp everything that becomes an address.
  int offset = 0, rows = 0;
#pragma unroll
  for (int r = 0; r < kUnitRangesInFlight; ++r) {
    const int n = min(max(q.ranges[r], 0), T_max);
    if (r < q.s) offset += n;
    if (r == q.s) rows = n;
  }
  for (int r = kUnitRangesInFlight; r <= q.s; ++r) {
    const int n = min(max(a.layout_range[q.e * R + r], 0), T_max);
    if (r < q.s) offset += n; else rows = n;
  }
  rows = min(rows, max(S - offset, 0));
  CombineUnit u;
  u.e = q.e;
  u.offset = offset;
  u.first = g.splits.div(rows * q.part);
  u.mine = g.splits.div(rows * (q.part + 1)) - u.first;
  u.to = q.to;
  return u;
}

// Blocks stride over (local expert e, source rank s != me) pairs: send e's rows from s back to s, slot
// [token][k]. A rank's answers to its own tokens are not staged: its receive reads them from y.
__global__ void __launch_bounds__(kThreads) ll_combine_send_kernel(PeerView v, LowLatencyCombineSendArgs a,
                                                                  CombineSendGrid g) {
  const uint64_t entry_ns = global_timer_ns();
  const LowLatencyLayout& l = v.ll;
  const int R = l.num_ranks, H = l.hidden, K = l.num_topk, T_max = l.max_tokens;
  const int S = R * T_max, units = g.pairs * g.splits.divisor;
  // Requested together before anything waits: the block's first unit, the epoch and, issued last (an acquire holds
  // back the loads after it), the destinations' "done" flags that the last R threads check; the unit's ranges are
  // added up only after all of them went out.
  const int waiter = static_cast<int>(threadIdx.x) - (kThreads - R);
  const bool has_unit = static_cast<int>(blockIdx.x) < units;
  UnitRequest first_request;
  if (has_unit) first_request = request_unit(v, a, g, blockIdx.x);
  __shared__ uint64_t s_epoch;
  if (threadIdx.x == 0) s_epoch = take_op_epoch(field<uint64_t>(v.local, l.combine_epoch));
  DoneSeen seen;
  if (waiter >= 0) seen = load_done_flags(v, l.combine_done, waiter);
  trap_if_closed(v, kLivenessChecker);  // after the loads above: its branch holds its warp's later loads back
  CombineUnit u;
  if (has_unit) u = settle_unit(v, a, g, first_request);
  __syncthreads();
  const uint64_t epoch = s_epoch;
  const size_t parity = epoch & 1;
  if (waiter >= 0) wait_staging_free(v, l.combine_done, epoch, waiter, kPhaseLowLatencyCombineSend, seen.own, seen.dest);
  __syncthreads();
  stamp_start(v, kCombineSendKernel, epoch, entry_ns);  // every write after the liveness and staging checks
  for (int unit = blockIdx.x; unit < units; unit += gridDim.x) {
  if (unit != static_cast<int>(blockIdx.x)) u = settle_unit(v, a, g, request_unit(v, a, g, unit));
  const int e = u.e, offset = u.offset, first = u.first, mine = u.mine;
  const int row_bytes = 2 * H, chunks = ceil_div(row_bytes, kChunkBytes);
  uint8_t* const stage = u.to + l.combine_stage + parity * T_max * K * static_cast<size_t>(row_bytes);
  int i = 0, chunk = 0;  // row first + i of the unit
  for (step_row_chunk(i, chunk, threadIdx.x >> 5, chunks); i < mine; step_row_chunk(i, chunk, kWarps, chunks)) {
    const size_t in_row = static_cast<size_t>(e) * S + offset + first + i;
    // The chunk's loads go out before the handle's (t, k) are read: the two latencies overlap.
    int4 v4[4];
    warp_load_chunk<false>(static_cast<const uint8_t*>(a.y) + in_row * row_bytes, row_bytes, chunk, v4);
    const int t = a.src_info[in_row], k = a.recv_k[in_row];
    if (t < 0 || t >= T_max || k < 0 || k >= K) continue;
    warp_store_chunk(stage + (static_cast<size_t>(t) * K + k) * row_bytes, row_bytes, chunk, v4);
  }
  }
  finish_send_block(v, a.ticket, kCombineSendKernel, l.combine_signal, epoch, global_timer_ns());
}

// Where the answer to (token t, expert id) is, for a token of this rank: the owner's staged slot [t][first k],
// or, when this rank owns the expert, y's row of it: the dispatch placed this rank's rows for expert e after
// those of the ranks before it, in token order, so the row is e * S + sum_{s < me} rows(e, s) + slot, slot =
// this rank's tokens before t that the dispatch delivered to e (the handle's own_bits). Null when the handle says
// no such row was received (a topk_idx other than the dispatch's; docs/semantics.md): that answer counts as zero.
__device__ __forceinline__ const int4* combine_answer_row(const PeerView& v, const LowLatencyCombineRecvArgs& a,
                                                          size_t parity, int t, int id, int first_k) {
  const LowLatencyLayout& l = v.ll;
  const int R = l.num_ranks, T_max = l.max_tokens, H = l.hidden, K = l.num_topk;
  const int W = low_latency_token_words(T_max);
  const auto [owner, e] = l.local_experts_div.divmod(id);
  if (owner != v.rank) {
    return reinterpret_cast<const int4*>(v.local + l.combine_stage +
                                         ((parity * T_max + t) * K + first_k) * static_cast<size_t>(2 * H));
  }
  const uint32_t* bits = a.own_bits + e * W;
  const uint32_t word = bits[t >> 5];
  int slot = __popc(word & ((1u << (t & 31)) - 1u));
#pragma unroll 4
  for (int w = 0; w < (t >> 5); ++w) slot += __popc(bits[w]);
  int offset = 0;
#pragma unroll 4
  for (int r = 0; r < v.rank; ++r) offset += min(max(a.layout_range[e * R + r], 0), T_max);
  const int rows = min(max(a.layout_range[e * R + v.rank], 0), T_max);
  if (!((word >> (t & 31)) & 1u) || slot >= rows || offset + slot >= R * T_max) return nullptr;
  return reinterpret_cast<const int4*>(static_cast<const uint8_t*>(a.y) +
                                       (static_cast<size_t>(e) * R * T_max + offset + slot) * (2 * H));
}

// A token's routing, lane k < K of the setup warp holding its k-th expert id and weight: the first of a token's two
// load rounds, which needs nothing of the op, so the block's first token's goes out before the ticket.
struct TokenRoute {
  int id = -1;
  float weight = 0.f;
};

__device__ __forceinline__ TokenRoute load_token_route(const LowLatencyCombineRecvArgs& a, int t, int K, int E) {
  TokenRoute route;
  const int k = threadIdx.x & 31;
  if (k < K) {
    route.id = sanitize(a.topk_idx[t * K + k], E);
    route.weight = a.topk_weights[t * K + k];
  }
  return route;
}

// Where token t's K answers are (the second round: the handle's words for answers this rank owns), called by the
// whole setup warp; lanes k < K write answer[k] / weight[k].
__device__ __forceinline__ void combine_token_setup(const PeerView& v, const LowLatencyCombineRecvArgs& a,
                                                    size_t parity, int t, const TokenRoute& route, const int4** answer,
                                                    float* weight) {
  const int K = v.ll.num_topk, k = threadIdx.x & 31;
  int first = k;  // the first k naming this expert: the slot the owner answered into
  for (int j = 0; j < K; ++j) {
    const int other = __shfl_sync(kFullMask, route.id, j);
    if (j < first && other == route.id) first = j;
  }
  if (k < K) {
    answer[k] = route.id < 0 ? nullptr : combine_answer_row(v, a, parity, t, route.id, first);
    weight[k] = route.weight;
  }
}

// Blocks stride over (token, column part) items (at least one block, which also does the handshake when T = 0). Where
// the block's first token's answers are needs no peer, so the last warp finds it while threads i < 2R wait for the
// owners.
__global__ void __launch_bounds__(kThreads, kDispatchBlocksPerSm) ll_combine_recv_kernel(PeerView v, LowLatencyCombineRecvArgs a,
                                                                                         FastDivmod column_parts) {
  __shared__ const int4* answer[32];
  __shared__ float weight[32];
  const uint64_t entry_ns = global_timer_ns();
  const LowLatencyLayout& l = v.ll;
  const int H = l.hidden, K = l.num_topk, E = l.num_experts;
  const bool setup_warp = threadIdx.x >= kThreads - 32;
  TokenRoute route;
  // Item i: token i / column_parts, its columns part i % column_parts (a token's columns split over blocks where the
  // grid budget allows: each thread's chain of dependent load rounds is that much shorter).
  const int parts = column_parts.divisor, items = a.num_tokens * parts, vecs = H / 8;
  if (setup_warp && blockIdx.x < items) route = load_token_route(a, column_parts.div(blockIdx.x), K, E);
  const uint64_t epoch = ticket_epoch(a.ticket);
  const size_t parity = epoch & 1;
  const uint64_t received = load_received(v, l.combine_done);
  wait_for_signals(v, field<uint64_t>(v.local, l.combine_signal), epoch, kPhaseLowLatencyCombineRecv);
  trap_if_closed(v, kLivenessChecker);
  check_receive_order(v, received, epoch);
  if (setup_warp && blockIdx.x < items) combine_token_setup(v, a, parity, column_parts.div(blockIdx.x), route, answer, weight);
  __syncthreads();
  stamp_start(v, kCombineRecvKernel, epoch, entry_ns);  // every write after the liveness check
  if (threadIdx.x == 0) stamp_wait_end(v, 1);
  for (int item = blockIdx.x; item < items; item += gridDim.x) {
  const auto [t, part] = column_parts.divmod(item);
  if (item != static_cast<int>(blockIdx.x)) {
    __syncthreads();  // answer / weight of the previous token are no longer read
    if (setup_warp) combine_token_setup(v, a, parity, t, load_token_route(a, t, K, E), answer, weight);
    __syncthreads();
  }
  {
    int4* out = reinterpret_cast<int4*>(static_cast<uint8_t*>(a.out) + static_cast<size_t>(t) * 2 * H);
    const int c_end = column_parts.div(vecs * (part + 1));
    for (int c = column_parts.div(vecs * part) + threadIdx.x; c < c_end; c += blockDim.x) {
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int k0 = 0; k0 < K; k0 += 4) {  // four answers' loads in flight, summed in ascending k
        int4 raw[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int4* row = k0 + u < K ? answer[k0 + u] : nullptr;
          if (row != nullptr) raw[u] = ld_peer_written(row + c);
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          if (k0 + u >= K || answer[k0 + u] == nullptr) continue;  // the reference adds +0: acc + 0.0f == acc but for -0.0
          float f[8];
          unpack_bf16x8(raw[u], f);
          const float w = weight[k0 + u];
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(f[i], w));
        }
      }
      int4 packed;
      __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
      for (int i = 0; i < 4; ++i) p[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
      out[c] = packed;
    }
  }
  }
  finish_receive_block(v, kCombineRecvKernel, 1, kCombineSendKernel, l.combine_done, epoch);
}

// Grids of the receive-side kernels: one block per work item (pair or token), within the budget. Measured on
// the H200 (R=2): capping them at one block per SM made dispatch_recv 17 -> 33 us, so they are not capped
// below the budget.
int receive_grid(int num_blocks) { return num_blocks; }

// The dispatch send and the combine receive, both built for kDispatchBlocksPerSm blocks per SM, take five blocks
// per SM of the budget, which counts four. Measured on the H200 at R=8 (medians, both GPUs): with 14 SMs per rank,
// combine 110.0-110.6 -> 104.1-104.9 us (the receive's grid; the dispatch within the spread between variants,
// 83.3-84.3 against 84.2-85.2); with jax_ep.launch's 16 SMs per rank, dispatch 83.8-84.6 -> 76.5-77.0 (send
// 27.1-27.3 -> 26.5-27.0, the receive's wait for the latest sender 16-17 -> 10-12 us; which grid brings it was not
// measured apart) and combine 100.9-102.2 -> 100.5-101.2 (within noise). R=2 grids are capped by the work (T = 128),
// not the budget. The dispatch receive keeps four per SM: five measured 78.0-78.3 against 76.5-77.0 us at 16 SMs
// (its wait unchanged, the time after it ~1 us longer; why was not measured).
int five_per_sm_grid(int num_blocks) { return num_blocks + num_blocks / 4; }

constexpr int kCombineSendSplits = 4;
// The combine receive splits a token's columns over this many blocks where the grid budget has room (R=2: 2 x 128
// tokens within 330 blocks): each thread then runs half as many dependent rounds of answer loads. Measured on the H200
// (medians, both GPUs): R=2 combine 27.1-27.4 -> 24.7-25.1 us (the receive after its wait 11 -> 8 us); R=8 has no
// room (80 blocks for 128 tokens) and is unchanged.
constexpr int kCombineRecvParts = 2;

int capped_grid(int wanted, int budget) { return wanted < 1 ? 1 : (budget > 0 && wanted > budget ? budget : wanted); }

// How many blocks each of `items` work items may be split over within the grid budget (1 when there is no room).
int parts_within(int budget, int items, int max_parts) {
  return items > 0 ? std::max(1, std::min(max_parts, budget / items)) : 1;
}

}  // namespace

LowLatencyLayout make_low_latency_layout(size_t base, int num_ranks, int num_experts, int max_tokens, int num_topk,
                                         int hidden) {
  LowLatencyLayout l;
  l.dispatch_epoch = l.combine_epoch = l.counters = l.timing = l.dispatch_signal = l.dispatch_bits = l.dispatch_done = l.combine_signal =
      l.combine_done = l.dispatch_stage = l.combine_stage = base;
  l.end = base;
  if (num_experts <= 0) return l;
  l.enabled = true;
  l.num_ranks = num_ranks;
  l.num_experts = num_experts;
  l.max_tokens = max_tokens;
  l.num_topk = num_topk;
  l.hidden = hidden;
  l.row_stride = round_up(low_latency_header_bytes(num_topk) + 2 * hidden, 16);  // bf16 is the widest payload (fp8 + f32 scales < 2H)
  l.ranks_div = FastDivmod(num_ranks);
  l.local_experts_div = FastDivmod(num_experts / num_ranks);
  size_t off = round_up<size_t>(base, 256);
  auto take = [&off](size_t bytes) {
    const size_t at = off;
    off = round_up<size_t>(off + bytes, 256);
    return at;
  };
  const size_t R = num_ranks, E_loc = num_experts / num_ranks, T = max_tokens, K = num_topk, H = hidden;
  l.dispatch_epoch = take(8);
  l.combine_epoch = take(8);
  l.counters = take(16);
  l.timing = take(8 * kLowLatencyTimingWords);
  l.dispatch_signal = take(8 * R);
  l.dispatch_bits = take(4 * kLowLatencyBitsCopies * E_loc * R * static_cast<size_t>(low_latency_token_words(max_tokens)));
  l.dispatch_done = take(8 * R);
  l.combine_signal = take(8 * R);
  l.combine_done = take(8 * R);
  l.dispatch_stage = take(2 * R * T * static_cast<size_t>(l.row_stride));
  l.combine_stage = take(2 * T * K * 2 * H);
  l.end = off;
  return l;
}

cudaError_t launch_low_latency_dispatch_send(const PeerView& view, const LowLatencyDispatchSendArgs& args,
                                             int num_blocks, cudaStream_t stream) {
  const int T = args.num_tokens, budget = five_per_sm_grid(num_blocks);
  const int row_parts = parts_within(budget, T, kSendRowParts);
  const int grid = row_parts > 1 ? T * row_parts : capped_grid(T, budget);
  int tokens_per_pass = std::max(1, std::min(kSendTokensPerPass, ceil_div(T, grid / row_parts)));
  if (tokens_per_pass * 2 * static_cast<size_t>(view.ll.hidden) > kSendPassSmemCap) tokens_per_pass = 1;
  const size_t smem = static_cast<size_t>(tokens_per_pass) * 2 * view.ll.hidden;
  const bool one_gpu = view.every_rank_on_this_gpu();
  auto* kernel = row_parts > 1
      ? (one_gpu ? ll_dispatch_send_kernel<true, true> : ll_dispatch_send_kernel<true, false>)
      : (one_gpu ? ll_dispatch_send_kernel<false, true> : ll_dispatch_send_kernel<false, false>);
  if (smem > 48 * 1024) {  // past the default: opt in (Hopper allows up to 227 KB per block)
    JAX_EP_CUDA_RETURN_IF_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  if (static_cast<uint64_t>(grid) >= kOpUnit) return cudaErrorInvalidConfiguration;  // the blocks' shares must fit an op
  kernel<<<grid, kThreads, smem, stream>>>(view, args, tokens_per_pass, FastDivmod(row_parts));
  return cudaGetLastError();
}

cudaError_t launch_low_latency_dispatch_recv(const PeerView& view, const LowLatencyDispatchRecvArgs& args,
                                             int num_blocks, cudaStream_t stream) {
  const size_t smem = sizeof(uint32_t) * view.ll.token_words() + sizeof(uint16_t) * view.ll.max_tokens;
  ll_dispatch_recv_kernel<<<capped_grid(view.ll.num_experts, receive_grid(num_blocks)), kThreads, smem, stream>>>(view, args);
  return cudaGetLastError();
}

cudaError_t launch_low_latency_combine_send(const PeerView& view, const LowLatencyCombineSendArgs& args,
                                            int num_blocks, cudaStream_t stream) {
  // Its own rank's answers are not sent. Where the budget allows, each pair's rows are split over up to
  // kCombineSendSplits blocks: at R=2 one block per pair left each block four dependent load rounds.
  CombineSendGrid g;
  g.pairs = view.ll.local_experts() * (view.ll.num_ranks - 1);
  g.splits = FastDivmod(parts_within(num_blocks, g.pairs, kCombineSendSplits));
  g.others = FastDivmod(view.ll.num_ranks - 1);
  const int grid = capped_grid(g.pairs * g.splits.divisor, receive_grid(num_blocks));
  if (static_cast<uint64_t>(grid) >= kOpUnit) return cudaErrorInvalidConfiguration;  // the blocks' shares must fit an op
  ll_combine_send_kernel<<<grid, kThreads, 0, stream>>>(view, args, g);
  return cudaGetLastError();
}

cudaError_t launch_low_latency_combine_recv(const PeerView& view, const LowLatencyCombineRecvArgs& args,
                                            int num_blocks, cudaStream_t stream) {
  const int budget = five_per_sm_grid(num_blocks);
  const int parts = parts_within(budget, args.num_tokens, kCombineRecvParts);
  ll_combine_recv_kernel<<<capped_grid(args.num_tokens * parts, budget), kThreads, 0, stream>>>(view, args, FastDivmod(parts));
  return cudaGetLastError();
}

}  // namespace jax_ep
