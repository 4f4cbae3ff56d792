// Row loops of tdiff::cached_block and its backward. Per instruction set.
#pragma once

#include "cpu_kernels.h"
#include "loops/vec_io.h"

template <typename T>
void cached_block_row(const tdiff::CachedBlockRow<T>& a) {
  using IO = Io<T>;
  using V = typename IO::V;
  using Raw = typename IO::Raw;
  constexpr int P = IO::P;
  for_each_step<T>(a.c, [&](int64_t j, int64_t count) {
    // the branch is copied bit for bit, then widened for the gated residual
    const Raw raw = count == IO::W ? Raw::loadu(a.branch_in + j) : Raw::loadu(a.branch_in + j, count);
    if (count == IO::W)
      raw.store(a.branch_out + j);
    else
      raw.store(a.branch_out + j, count);
    V br[P], x[P], g[P];
    IO::load(a.branch_in + j, count, br);
    IO::load(a.x + j, count, x);
    IO::load(a.gate + j, count, g);
    for (int i = 0; i < P; ++i) x[i] = at::vec::fmadd(g[i], br[i], x[i]);
    IO::store(a.out + j, count, x);
  });
}

template <typename T>
void cached_block_backward_row(const tdiff::CachedBlockBackwardRow<T>& a) {
  using IO = Io<T>;
  using V = typename IO::V;
  using Raw = typename IO::Raw;
  constexpr int P = IO::P;
  for_each_step<T>(a.c, [&](int64_t j, int64_t count) {
    const Raw raw = count == IO::W ? Raw::loadu(a.gout + j) : Raw::loadu(a.gout + j, count);
    if (count == IO::W)
      raw.store(a.gx + j);
    else
      raw.store(a.gx + j, count);
    V go[P], br[P], acc[P], g[P], gb[P];
    IO::load(a.gout + j, count, go);
    IO::load(a.branch + j, count, br);
    IO::load_acc(a.gate_acc + j, count, acc);
    for (int i = 0; i < P; ++i) acc[i] = at::vec::fmadd(go[i], br[i], acc[i]);
    IO::store_acc(a.gate_acc + j, count, acc);
    IO::load(a.gate + j, count, g);
    IO::load(a.gbr + j, count, gb);
    for (int i = 0; i < P; ++i) g[i] = at::vec::fmadd(go[i], g[i], gb[i]);
    IO::store(a.to + j, count, g);
  });
  if (a.zero != nullptr) std::fill(a.zero, a.zero + a.c, T(0));
}
