// SID trie construction and batched queries (pybind11).
//
// Build: pack every SID into one 64-bit key (128-bit when the level bit widths
// need more), LSD radix sort (key, row) pairs in parallel, then one linear
// pass over the sorted distinct keys emits every level of the compressed CSR.
// The physical format is documented in plum/sid/trie.py; this file holds no
// Python logic. All heavy work runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

using u128 = unsigned __int128;

// ---------------------------------------------------------------- threading
int resolve_threads(int requested, int64_t work) {
  int hw = static_cast<int>(std::thread::hardware_concurrency());
  if (hw <= 0) hw = 1;
  int t = requested > 0 ? requested : hw;
  // Below ~64k items per thread the spawn cost dominates.
  int64_t useful = std::max<int64_t>(1, work / 65536);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(t, useful)));
}

// Runs fn(tid, begin, end) over [0, n) split into `threads` contiguous chunks.
void parallel_chunks(int threads, int64_t n,
                     const std::function<void(int, int64_t, int64_t)>& fn) {
  if (threads <= 1 || n < 2) {
    fn(0, 0, n);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) {
    int64_t b = n * t / threads, e = n * (t + 1) / threads;
    pool.emplace_back(fn, t, b, e);
  }
  fn(0, 0, n / threads);
  for (auto& th : pool) th.join();
}

// ---------------------------------------------------------------- layout
struct Layout {
  int L = 0;
  std::vector<int64_t> sizes;  // codebook size per level
  std::vector<int> bits;       // bits per level
  std::vector<int> shift;      // shift of level l in the packed key (level 0 highest)
  int total_bits = 0;
  int chain_min_depth = 1;     // shallowest depth at which a chain may start
  std::vector<int> level_of_bit;  // bit position -> level

  explicit Layout(const std::vector<int64_t>& codebook_sizes) : sizes(codebook_sizes) {
    L = static_cast<int>(sizes.size());
    bits.resize(L);
    shift.resize(L);
    for (int l = 0; l < L; ++l) {
      int64_t v = sizes[l] - 1;
      int b = 0;
      while (v > 0) { ++b; v >>= 1; }
      bits[l] = b;
    }
    int s = 0;
    for (int l = L - 1; l >= 0; --l) { shift[l] = s; s += bits[l]; }
    total_bits = s;
    level_of_bit.assign(std::max(1, total_bits), 0);
    for (int l = 0; l < L; ++l)
      for (int b = 0; b < bits[l]; ++b) level_of_bit[shift[l] + b] = l;
    // A chain entered at depth d stores the codes of levels d..L-1, i.e. the
    // low shift[d-1] bits of the key; they must fit in 31 bits (edge_word >= 0).
    chain_min_depth = L;
    for (int d = 1; d <= L; ++d)
      if (shift[d - 1] <= 31) { chain_min_depth = d; break; }
  }
  int64_t suffix_mask(int depth) const {  // codes of levels depth..L-1
    int sb = depth >= 1 ? shift[depth - 1] : total_bits;
    return sb >= 63 ? -1 : ((int64_t(1) << sb) - 1);
  }
};

template <class K>
inline int first_diff_level(const Layout& lay, K a, K b) {
  K x = a ^ b;
  if (x == 0) return lay.L;
  int p;
  if constexpr (sizeof(K) == 8) {
    p = 63 - __builtin_clzll(static_cast<uint64_t>(x));
  } else {
    uint64_t hi = static_cast<uint64_t>(x >> 64);
    p = hi ? 127 - __builtin_clzll(hi) : 63 - __builtin_clzll(static_cast<uint64_t>(x));
  }
  return lay.level_of_bit[p];
}

template <class K>
inline int64_t level_code(const Layout& lay, K key, int l) {
  return static_cast<int64_t>((key >> lay.shift[l]) & ((K(1) << lay.bits[l]) - 1));
}

// ---------------------------------------------------------------- packing
struct BadCode {
  int64_t row = -1, level = -1, value = 0;
};

// Calls f(T{}) with T the C type of an integer numpy dtype (kind 'i' or 'u').
template <class F>
void dispatch_int_dtype(char kind, int size, F&& f) {
  if (kind == 'i') {
    if (size == 1) f(int8_t{}); else if (size == 2) f(int16_t{});
    else if (size == 4) f(int32_t{}); else f(int64_t{});
  } else {
    if (size == 1) f(uint8_t{}); else if (size == 2) f(uint16_t{});
    else if (size == 4) f(uint32_t{}); else f(uint64_t{});
  }
}

// Throws ValueError unless integer array `a` is in the machine's byte order (the
// readers below take its bytes as native integers).
void require_native_order(const py::array& a, const char* name) {
  const uint16_t one = 1;
  const char native = *reinterpret_cast<const char*>(&one) == 1 ? '<' : '>';
  const char order = a.dtype().byteorder();
  if (order != '=' && order != '|' && order != native)
    throw std::invalid_argument(std::string(name) + " is not in native byte order: convert it with "
                                "astype(dtype.newbyteorder('='))");
}

// ValueError naming the array, row, level and the codebook it falls outside.
[[noreturn]] void throw_bad_code(const char* name, const BadCode& bad, const std::vector<int64_t>& sizes) {
  std::ostringstream os;
  os << name << "[" << bad.row << ", " << bad.level << "] = " << bad.value
     << " is outside level " << bad.level << "'s codebook [0, " << sizes[bad.level] << ")";
  throw std::invalid_argument(os.str());
}

template <class T, class K>
void pack_keys(const char* base, int64_t s0, int64_t s1, int64_t n, const Layout& lay,
               K* keys, int threads, BadCode& bad) {
  std::vector<BadCode> bads(threads);
  parallel_chunks(threads, n, [&](int tid, int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const char* row = base + r * s0;
      K key = 0;
      for (int l = 0; l < lay.L; ++l) {
        T v = *reinterpret_cast<const T*>(row + l * s1);
        // Compare in the widest signed/unsigned-safe way.
        bool neg = std::is_signed<T>::value && v < 0;
        if (neg || static_cast<uint64_t>(v) >= static_cast<uint64_t>(lay.sizes[l])) {
          bads[tid] = {r, l, static_cast<int64_t>(v)};
          return;  // the first bad row of this chunk is the smallest in it
        }
        key |= static_cast<K>(v) << lay.shift[l];
      }
      keys[r] = key;
    }
  });
  for (auto& x : bads)
    if (x.row >= 0 && (bad.row < 0 || x.row < bad.row)) bad = x;
}

// ---------------------------------------------------------------- radix sort
// Stable LSD radix sort of (keys, rows) on the low `total_bits` bits.
template <class K>
void radix_sort(std::vector<K>& keys, std::vector<uint32_t>& rows, int total_bits, int threads) {
  const int64_t n = static_cast<int64_t>(keys.size());
  if (n < 2 || total_bits == 0) return;
  const int R = n < (1 << 16) ? 8 : 11;
  const int B = 1 << R;
  std::vector<K> k2(n);
  std::vector<uint32_t> r2(n);
  std::vector<int64_t> hist(static_cast<size_t>(threads) * B);
  for (int sh = 0; sh < total_bits; sh += R) {
    std::fill(hist.begin(), hist.end(), 0);
    parallel_chunks(threads, n, [&](int tid, int64_t b, int64_t e) {
      int64_t* h = hist.data() + static_cast<size_t>(tid) * B;
      for (int64_t i = b; i < e; ++i) ++h[static_cast<size_t>((keys[i] >> sh) & (B - 1))];
    });
    // Skip a pass where every key has the same digit.
    bool trivial = false;
    for (int d = 0; d < B && !trivial; ++d) {
      int64_t tot = 0;
      for (int t = 0; t < threads; ++t) tot += hist[static_cast<size_t>(t) * B + d];
      if (tot == n) trivial = true;
      else if (tot > 0) break;
    }
    if (trivial) continue;
    int64_t run = 0;
    for (int d = 0; d < B; ++d)
      for (int t = 0; t < threads; ++t) {
        int64_t c = hist[static_cast<size_t>(t) * B + d];
        hist[static_cast<size_t>(t) * B + d] = run;
        run += c;
      }
    parallel_chunks(threads, n, [&](int tid, int64_t b, int64_t e) {
      int64_t* off = hist.data() + static_cast<size_t>(tid) * B;
      for (int64_t i = b; i < e; ++i) {
        int64_t dst = off[static_cast<size_t>((keys[i] >> sh) & (B - 1))]++;
        k2[dst] = keys[i];
        r2[dst] = rows[i];
      }
    });
    keys.swap(k2);
    rows.swap(r2);
  }
}

// ---------------------------------------------------------------- build
template <class A>
A* data_of(py::array& a) { return static_cast<A*>(a.mutable_data()); }

template <class K, class ItemT>
py::dict build_impl(const Layout& lay, std::vector<K>& keys, std::vector<uint32_t>& rows,
                    const ItemT* item_ids, int threads) {
  const int L = lay.L;
  const int64_t n = static_cast<int64_t>(keys.size());
  const int dstar = lay.chain_min_depth;

  // ---- pass 1 (no GIL): distinct SIDs, their lcp with the previous one, terminal depths.
  std::vector<int64_t> sid_start;   // first sorted position of each distinct SID
  std::vector<uint8_t> sid_lcp;     // shared levels with the previous distinct SID
  std::vector<uint8_t> sid_term;    // depth of the terminal (chain) edge
  std::vector<int64_t> cnt_edges, cnt_int;  // [chunk][depth]
  std::vector<int64_t> cnt_dup, cnt_dup_items;  // [chunk]
  int64_t U = 0, logical_nodes = 0;
  int csize = 0;
  {
    py::gil_scoped_release nogil;
    radix_sort(keys, rows, lay.total_bits, threads);
    // distinct starts
    std::vector<int64_t> per_thread(threads, 0);
    std::vector<uint8_t> is_start(n);
    parallel_chunks(threads, n, [&](int tid, int64_t b, int64_t e) {
      int64_t c = 0;
      for (int64_t i = b; i < e; ++i) {
        is_start[i] = (i == 0 || keys[i] != keys[i - 1]);
        c += is_start[i];
      }
      per_thread[tid] = c;
    });
    std::vector<int64_t> base(threads + 1, 0);
    for (int t = 0; t < threads; ++t) base[t + 1] = base[t] + per_thread[t];
    U = base[threads];
    sid_start.resize(U);
    sid_lcp.resize(U);
    parallel_chunks(threads, n, [&](int tid, int64_t b, int64_t e) {
      int64_t j = base[tid];
      for (int64_t i = b; i < e; ++i)
        if (is_start[i]) {
          sid_start[j] = i;
          sid_lcp[j] = static_cast<uint8_t>(i == 0 ? 0 : first_diff_level(lay, keys[i - 1], keys[i]));
          ++j;
        }
    });
    std::vector<uint8_t>().swap(is_start);
    sid_term.resize(U);
    csize = resolve_threads(threads, U);
    cnt_edges.assign(static_cast<size_t>(csize) * (L + 2), 0);
    cnt_int.assign(static_cast<size_t>(csize) * (L + 2), 0);
    cnt_dup.assign(csize, 0);
    cnt_dup_items.assign(csize, 0);
    std::vector<int64_t> lnodes(csize, 0);
    parallel_chunks(csize, U, [&](int tid, int64_t b, int64_t e) {
      int64_t* ce = cnt_edges.data() + static_cast<size_t>(tid) * (L + 2);
      int64_t* ci = cnt_int.data() + static_cast<size_t>(tid) * (L + 2);
      for (int64_t j = b; j < e; ++j) {
        int lp = j == 0 ? 0 : sid_lcp[j];
        int ln = j + 1 < U ? sid_lcp[j + 1] : 0;
        int t = std::max(std::max(lp, ln) + 1, dstar);
        sid_term[j] = static_cast<uint8_t>(t);
        int first = j == 0 ? 1 : lp + 1;  // first depth at which j starts a new prefix
        lnodes[tid] += L - first + 1;
        for (int d = first; d <= t; ++d) ++ce[d];
        for (int d = first; d < t; ++d) ++ci[d];
        int64_t end = j + 1 < U ? sid_start[j + 1] : n;
        int64_t cnt = end - sid_start[j];
        if (cnt > 1) { ++cnt_dup[tid]; cnt_dup_items[tid] += cnt; }
      }
    });
    logical_nodes = 1;
    for (auto v : lnodes) logical_nodes += v;
  }
  if (U == 0) throw std::invalid_argument("codes: empty input");

  // ---- offsets: per depth bases and per chunk ranks.
  std::vector<int64_t> edge_base(L + 2, 0), int_base(L + 2, 0);
  std::vector<int64_t> tot_e(L + 2, 0), tot_i(L + 2, 0);
  for (int c = 0; c < csize; ++c)
    for (int d = 0; d <= L + 1; ++d) {
      tot_e[d] += cnt_edges[static_cast<size_t>(c) * (L + 2) + d];
      tot_i[d] += cnt_int[static_cast<size_t>(c) * (L + 2) + d];
    }
  edge_base[1] = 0;
  for (int d = 1; d <= L; ++d) edge_base[d + 1] = edge_base[d] + tot_e[d];
  int_base[0] = 0;
  int_base[1] = 1;  // the root
  for (int d = 1; d <= L; ++d) int_base[d + 1] = int_base[d] + tot_i[d];
  const int64_t E = edge_base[L + 1];
  const int64_t I = int_base[L + 1];  // == int_base[L] (no internal node at depth L)
  if (I >= (int64_t(1) << 31)) throw std::invalid_argument("the trie would have more than 2**31 internal nodes");
  // Per-chunk running ranks (exclusive prefix over chunks).
  std::vector<int64_t> rank_e(static_cast<size_t>(csize) * (L + 2)), rank_i(rank_e.size());
  for (int d = 0; d <= L + 1; ++d) {
    int64_t re = 0, ri = 0;
    for (int c = 0; c < csize; ++c) {
      size_t k = static_cast<size_t>(c) * (L + 2) + d;
      rank_e[k] = re; re += cnt_edges[k];
      rank_i[k] = ri; ri += cnt_int[k];
    }
  }
  std::vector<int64_t> dup_base(csize + 1, 0), dup_item_base(csize + 1, 0);
  for (int c = 0; c < csize; ++c) {
    dup_base[c + 1] = dup_base[c] + cnt_dup[c];
    dup_item_base[c + 1] = dup_item_base[c] + cnt_dup_items[c];
  }
  const int64_t C = dup_base[csize];

  // ---- allocate outputs (GIL held).
  const bool narrow_tokens = *std::max_element(lay.sizes.begin(), lay.sizes.end()) <= 32768;
  py::array child_ptr = py::array_t<int64_t>(I + 1);
  py::array child_token = narrow_tokens ? py::array(py::array_t<int16_t>(E)) : py::array(py::array_t<int32_t>(E));
  py::array edge_word = py::array_t<int32_t>(E);
  py::array edge_item = py::array_t<ItemT>(E);
  py::array dup_ptr = py::array_t<int64_t>(C + 1);
  py::array dup_items = py::array_t<ItemT>(dup_item_base[csize]);
  int64_t* cp = data_of<int64_t>(child_ptr);
  int16_t* ct16 = narrow_tokens ? data_of<int16_t>(child_token) : nullptr;
  int32_t* ct32 = narrow_tokens ? nullptr : data_of<int32_t>(child_token);
  int32_t* ew = data_of<int32_t>(edge_word);
  ItemT* ei = data_of<ItemT>(edge_item);
  int64_t* dp = data_of<int64_t>(dup_ptr);
  ItemT* di = data_of<ItemT>(dup_items);

  // ---- pass 2 (no GIL): emit every level.
  {
    py::gil_scoped_release nogil;
    auto item_of = [&](int64_t sorted_pos) -> ItemT {
      uint32_t r = rows[sorted_pos];
      return item_ids ? item_ids[r] : static_cast<ItemT>(r);
    };
    cp[0] = 0;
    cp[I] = E;
    dp[C] = dup_item_base[csize];
    parallel_chunks(csize, U, [&](int tid, int64_t b, int64_t e) {
      std::vector<int64_t> re(rank_e.begin() + static_cast<size_t>(tid) * (L + 2),
                              rank_e.begin() + static_cast<size_t>(tid + 1) * (L + 2));
      std::vector<int64_t> ri(rank_i.begin() + static_cast<size_t>(tid) * (L + 2),
                              rank_i.begin() + static_cast<size_t>(tid + 1) * (L + 2));
      int64_t g = dup_base[tid], gi = dup_item_base[tid];
      for (int64_t j = b; j < e; ++j) {
        const K key = keys[sid_start[j]];
        const int t = sid_term[j];
        const int first = j == 0 ? 1 : sid_lcp[j] + 1;
        for (int d = first; d <= t; ++d) {
          const int64_t edge = edge_base[d] + re[d]++;
          const int64_t tok = level_code(lay, key, d - 1);
          if (ct16) ct16[edge] = static_cast<int16_t>(tok);
          else ct32[edge] = static_cast<int32_t>(tok);
          if (d < t) {
            const int64_t node = int_base[d] + ri[d]++;
            ew[edge] = static_cast<int32_t>(~node);
            cp[node] = edge_base[d + 1] + re[d + 1];
            ei[edge] = static_cast<ItemT>(-1);
          } else {
            ew[edge] = static_cast<int32_t>(static_cast<int64_t>(key & static_cast<K>(lay.suffix_mask(d))));
            const int64_t s = sid_start[j];
            const int64_t end = j + 1 < U ? sid_start[j + 1] : n;
            if (end - s == 1) {
              ei[edge] = item_of(s);
            } else {
              ei[edge] = static_cast<ItemT>(-(g + 2));
              dp[g] = gi;
              for (int64_t p = s; p < end; ++p) di[gi++] = item_of(p);
              ++g;
            }
          }
        }
      }
    });
  }

  py::array_t<int64_t> level_ptr(L + 1), edge_level_ptr(L + 1);
  for (int d = 0; d <= L; ++d) level_ptr.mutable_at(d) = std::min(int_base[d], I);
  for (int l = 0; l <= L; ++l) edge_level_ptr.mutable_at(l) = edge_base[l + 1];
  py::dict out;
  out["child_ptr"] = child_ptr;
  out["child_token"] = child_token;
  out["edge_word"] = edge_word;
  out["edge_item"] = edge_item;
  out["dup_ptr"] = dup_ptr;
  out["dup_items"] = dup_items;
  out["level_ptr"] = level_ptr;
  out["edge_level_ptr"] = edge_level_ptr;
  out["num_sids"] = U;
  out["num_logical_nodes"] = logical_nodes;
  out["chain_min_depth"] = dstar;
  out["key_bits"] = lay.total_bits;
  return out;
}

template <class K>
py::dict build_keys(const py::array& codes, const Layout& lay, const py::object& item_ids, int threads_req) {
  const int64_t n = codes.shape(0);
  const int threads = resolve_threads(threads_req, n);
  std::vector<K> keys(n);
  std::vector<uint32_t> rows(n);
  BadCode bad;
  {
    const char* base = static_cast<const char*>(codes.data());
    const int64_t s0 = codes.strides(0), s1 = codes.strides(1);
    const char kind = codes.dtype().kind();
    const int size = static_cast<int>(codes.dtype().itemsize());
    py::gil_scoped_release nogil;
    for (int64_t i = 0; i < n; ++i) rows[i] = static_cast<uint32_t>(i);
    dispatch_int_dtype(kind, size, [&](auto tag) {
      pack_keys<decltype(tag), K>(base, s0, s1, n, lay, keys.data(), threads, bad);
    });
  }
  if (bad.row >= 0) throw_bad_code("codes", bad, lay.sizes);
  if (item_ids.is_none()) return build_impl<K, int32_t>(lay, keys, rows, nullptr, threads);
  py::array ids = py::reinterpret_borrow<py::array>(item_ids);
  if (ids.dtype().is(py::dtype::of<int32_t>()))
    return build_impl<K, int32_t>(lay, keys, rows, static_cast<const int32_t*>(ids.data()), threads);
  return build_impl<K, int64_t>(lay, keys, rows, static_cast<const int64_t*>(ids.data()), threads);
}

py::dict build(const py::array& codes, const std::vector<int64_t>& codebook_sizes,
               const py::object& item_ids, int num_threads) {
  if (codes.ndim() != 2) throw std::invalid_argument("codes must be 2-D [N, L]");
  const char kind = codes.dtype().kind();
  if (kind != 'i' && kind != 'u') throw py::type_error("codes must have an integer dtype");
  require_native_order(codes, "codes");
  if (codes.shape(0) >= (int64_t(1) << 32) - 1)
    throw std::invalid_argument("codes: at most 2**32 - 2 rows are supported");
  Layout lay(codebook_sizes);
  if (lay.total_bits <= 64) return build_keys<uint64_t>(codes, lay, item_ids, num_threads);
  if (lay.total_bits <= 128) return build_keys<u128>(codes, lay, item_ids, num_threads);
  throw std::invalid_argument("codebook_sizes need " + std::to_string(lay.total_bits) +
                              " bits per SID; at most 128 are supported");
}

// ---------------------------------------------------------------- queries
struct TrieView {
  const int64_t* child_ptr;
  const int16_t* tok16;
  const int32_t* tok32;
  const int32_t* edge_word;
  int64_t num_internal;
  int64_t num_edges;
  inline int64_t token(int64_t e) const { return tok16 ? tok16[e] : tok32[e]; }
};

// Checks the dtypes, contiguity and lengths of the three arrays a walk reads
// (their values are checked by SIDTrie.load; step() bounds every read).
TrieView make_view(const py::array& child_ptr, const py::array& child_token, const py::array& edge_word) {
  auto check = [](const py::array& a, const char* name, bool ok_dtype) {
    if (a.ndim() != 1 || !ok_dtype || !(a.flags() & py::array::c_style))
      throw std::invalid_argument(std::string(name) + " must be a 1-D contiguous array of the trie format's dtype");
    require_native_order(a, name);
  };
  check(child_ptr, "child_ptr", child_ptr.dtype().is(py::dtype::of<int64_t>()));
  check(child_token, "child_token", child_token.dtype().is(py::dtype::of<int16_t>()) ||
                                        child_token.dtype().is(py::dtype::of<int32_t>()));
  check(edge_word, "edge_word", edge_word.dtype().is(py::dtype::of<int32_t>()));
  if (child_ptr.shape(0) < 1 || child_token.shape(0) != edge_word.shape(0))
    throw std::invalid_argument("child_ptr must be non-empty and child_token as long as edge_word");
  TrieView v;
  v.child_ptr = static_cast<const int64_t*>(child_ptr.data());
  const bool narrow = child_token.dtype().itemsize() == 2;
  v.tok16 = narrow ? static_cast<const int16_t*>(child_token.data()) : nullptr;
  v.tok32 = narrow ? nullptr : static_cast<const int32_t*>(child_token.data());
  v.edge_word = static_cast<const int32_t*>(edge_word.data());
  v.num_internal = child_ptr.shape(0) - 1;
  v.num_edges = edge_word.shape(0);
  return v;
}

constexpr int64_t kDamaged = -2;

// One step from `state` at depth `level` along `code`; -1 when absent,
// kDamaged when a pointer leads outside the arrays (nothing out of range is read).
inline int64_t step(const TrieView& t, const Layout& lay, int64_t state, int level, int64_t code) {
  if (state < t.num_internal) {
    int64_t lo = t.child_ptr[state], hi = t.child_ptr[state + 1];
    if (lo < 0 || lo > hi || hi > t.num_edges) return kDamaged;
    const int64_t end = hi;
    while (lo < hi) {  // lower bound on the sorted tokens
      int64_t mid = (lo + hi) >> 1;
      if (t.token(mid) < code) lo = mid + 1; else hi = mid;
    }
    if (lo == end || t.token(lo) != code) return -1;
    int32_t w = t.edge_word[lo];
    if (w < 0 && ~w >= t.num_internal) return kDamaged;
    return w < 0 ? static_cast<int64_t>(~w) : t.num_internal + lo;
  }
  const int64_t e = state - t.num_internal;
  if (e >= t.num_edges || lay.shift[level] > 31) return kDamaged;  // chains hold 31 bits
  const int64_t c = (static_cast<int64_t>(t.edge_word[e]) >> lay.shift[level]) & ((int64_t(1) << lay.bits[level]) - 1);
  return c == code ? state : -1;
}

template <class T>
void walk_rows(const char* base, int64_t s0, int64_t s1, int64_t m, int depth, const TrieView& t,
               const Layout& lay, int64_t* out, int threads, BadCode& bad, int64_t& damaged_row) {
  std::vector<BadCode> bads(threads);
  std::vector<int64_t> damaged(threads, -1);
  parallel_chunks(threads, m, [&](int tid, int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      int64_t s = 0;
      for (int l = 0; l < depth; ++l) {
        T v = *reinterpret_cast<const T*>(base + r * s0 + l * s1);
        bool neg = std::is_signed<T>::value && v < 0;
        if (neg || static_cast<uint64_t>(v) >= static_cast<uint64_t>(lay.sizes[l])) {
          if (bads[tid].row < 0) bads[tid] = {r, l, static_cast<int64_t>(v)};
          s = -1;
          break;
        }
        if (s >= 0) s = step(t, lay, s, l, static_cast<int64_t>(v));
        if (s == kDamaged) {
          if (damaged[tid] < 0) damaged[tid] = r;
          s = -1;
        }
      }
      out[r] = s;
    }
  });
  for (auto& x : bads)
    if (x.row >= 0 && (bad.row < 0 || x.row < bad.row)) bad = x;
  for (int64_t d : damaged)
    if (d >= 0 && (damaged_row < 0 || d < damaged_row)) damaged_row = d;
}

py::array_t<int64_t> walk(const py::array& prefixes, const std::vector<int64_t>& codebook_sizes,
                          const py::array& child_ptr, const py::array& child_token,
                          const py::array& edge_word, int num_threads) {
  if (prefixes.ndim() != 2) throw std::invalid_argument("prefixes must be 2-D [M, l]");
  const char kind = prefixes.dtype().kind();
  if (kind != 'i' && kind != 'u') throw py::type_error("prefixes must have an integer dtype");
  require_native_order(prefixes, "prefixes");
  Layout lay(codebook_sizes);
  const int64_t m = prefixes.shape(0);
  const int depth = static_cast<int>(prefixes.shape(1));
  if (depth > lay.L) throw std::invalid_argument("prefixes have more columns than the trie has levels");
  py::array_t<int64_t> out(m);
  int64_t* o = out.mutable_data();
  TrieView t = make_view(child_ptr, child_token, edge_word);
  BadCode bad;
  int64_t damaged_row = -1;
  {
    const char* base = static_cast<const char*>(prefixes.data());
    const int64_t s0 = prefixes.strides(0), s1 = prefixes.strides(1);
    const int size = static_cast<int>(prefixes.dtype().itemsize());
    const int threads = resolve_threads(num_threads, m * 4);
    py::gil_scoped_release nogil;
    dispatch_int_dtype(kind, size, [&](auto tag) {
      walk_rows<decltype(tag)>(base, s0, s1, m, depth, t, lay, o, threads, bad, damaged_row);
    });
  }
  if (bad.row >= 0) throw_bad_code("prefixes", bad, lay.sizes);
  if (damaged_row >= 0)
    throw std::invalid_argument("the trie is damaged: walking prefixes[" + std::to_string(damaged_row) +
                                "] leads outside child_ptr / edge_word (SIDTrie.load checks files)");
  return out;
}

}  // namespace

PYBIND11_MODULE(_sid_trie, m) {
  m.doc() = "C++ core of plum.sid.trie: SID trie construction and batched walks.";
  m.def("build", &build, py::arg("codes"), py::arg("codebook_sizes"), py::arg("item_ids") = py::none(),
        py::arg("num_threads") = 0,
        "Build the compressed CSR trie; returns a dict of numpy arrays and counts.");
  m.def("walk", &walk, py::arg("prefixes"), py::arg("codebook_sizes"), py::arg("child_ptr"),
        py::arg("child_token"), py::arg("edge_word"), py::arg("num_threads") = 0,
        "Walk each row of prefixes [M, l] from the root; returns state ids (-1 where absent).");
}
