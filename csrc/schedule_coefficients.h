// Per-sample schedule coefficients (a, s, c) for the fused CPU kernels.
// The closed forms are those of tdiff/schedules.py; kind codes match its KIND_* constants. Any kernel that needs
// alpha/sigma at a time t includes this header rather than writing the formulas again.
#pragma once

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace tdiff {

enum ScheduleKind : int64_t { VP_LINEAR = 0, VP_COSINE = 1, TABLE_VP = 2, VE = 3, EDM = 4, FLOW = 5 };
enum FdmOn : int64_t { FDM_OFF = 0, FDM_INPUT = 1, FDM_MEAN = 2 };

struct ScheduleSpec {
  int64_t kind;
  double p[4];
  const double* table;  // log-alpha on the uniform grid p[0] + i p[1], i < p[2] (TABLE_VP only)
  int64_t table_n;
  double precond_sigma_data;  // < 0: no preconditioning (c = 1)
  double fdm[6];              // m, beta_min, beta_d, u_min, u_max, source (0: EDM sigma, 1: time)
  int64_t fdm_on;
};

inline ScheduleSpec make_spec(int64_t kind, c10::ArrayRef<double> params, const double* table, int64_t table_n,
                              double precond_sigma_data, c10::ArrayRef<double> fdm, int64_t fdm_on) {
  TORCH_CHECK_VALUE(kind >= VP_LINEAR && kind <= FLOW, "tdiff: kind must be a schedule kind code 0..5, got ", kind);
  TORCH_CHECK_VALUE(params.size() == 4, "tdiff: params must hold 4 floats, got ", params.size());
  TORCH_CHECK_VALUE(kind != TABLE_VP || (table != nullptr && table_n >= 2 && params[2] == static_cast<double>(table_n)),
                    "tdiff: a discrete schedule needs its float64 log-alpha table with params[2] >= 2 entries");
  TORCH_CHECK_VALUE(kind != TABLE_VP || (std::isfinite(params[1]) && params[1] > 0.0),
                    "tdiff: a discrete schedule's grid step params[1] must be finite and positive, got ", params[1]);
  TORCH_CHECK_VALUE(fdm_on >= FDM_OFF && fdm_on <= FDM_MEAN, "tdiff: fdm_on must be 0 (off), 1 (input) or 2 (mean), got ",
                    fdm_on);
  TORCH_CHECK_VALUE(fdm_on == FDM_OFF || fdm.size() == 6,
                    "tdiff: fdm must hold 6 floats [m, beta_min, beta_d, u_min, u_max, source], got ", fdm.size());
  ScheduleSpec s{};
  s.kind = kind;
  std::copy(params.begin(), params.end(), s.p);
  s.table = table;
  s.table_n = table_n;
  s.precond_sigma_data = precond_sigma_data;
  if (fdm_on != FDM_OFF) std::copy(fdm.begin(), fdm.end(), s.fdm);
  s.fdm_on = fdm_on;
  return s;
}

// log alpha of the schedule at time t.
inline double log_alpha(const ScheduleSpec& sp, double t) {
  switch (sp.kind) {
    case VP_LINEAR:
      return -0.25 * t * t * (sp.p[1] - sp.p[0]) - 0.5 * t * sp.p[0];
    case VP_COSINE:
      return std::log(std::cos((t + sp.p[0]) / (1.0 + sp.p[0]) * M_PI / 2.0)) - sp.p[1];
    case TABLE_VP: {
      // piecewise-linear in t with linear extrapolation past both ends (DPM-Solver's interpolation)
      const double x = (t - sp.p[0]) / sp.p[1];
      // the segment index, in range whatever t is (NaN and +-inf included; their coefficients come out non-finite
      // and the public wrapper reports them)
      const double last = static_cast<double>(sp.table_n - 2);
      const int64_t i = x >= 1.0 ? static_cast<int64_t>(std::floor(std::min(x, last))) : 0;
      return sp.table[i] + (x - static_cast<double>(i)) * (sp.table[i + 1] - sp.table[i]);
    }
    case VE:
    case EDM:
      return 0.0;
    default:  // FLOW
      return std::log1p(-t);
  }
}

// A variance-preserving schedule: sigma^2 = 1 - alpha^2, so log sigma follows from log alpha
// (0.5 log(-expm1(2 log alpha))); the others give log sigma from t directly (log_sigma_of_time).
inline bool is_vp(const ScheduleSpec& sp) { return sp.kind == VP_LINEAR || sp.kind == VP_COSINE || sp.kind == TABLE_VP; }

// log sigma at time t of a schedule that is not variance-preserving.
inline double log_sigma_of_time(const ScheduleSpec& sp, double t) {
  switch (sp.kind) {
    case VE:
      return sp.p[0] + t * (sp.p[1] - sp.p[0]);
    default:  // EDM, FLOW
      return std::log(t);
  }
}

// out[0..2] = a, s, c for one sample from its time and log alpha / log sigma.
inline void finish_coefficients(const ScheduleSpec& sp, double t, double la, double ls, double* out) {
  double a = std::exp(la), s = std::exp(ls);
  double c = sp.precond_sigma_data < 0 ? 1.0
                                        : 1.0 / std::sqrt(s * s + sp.precond_sigma_data * sp.precond_sigma_data * a * a);
  if (sp.fdm_on != FDM_OFF) {
    const double u = sp.fdm[5] == 0.0 ? s / a : t;
    const double tp = (u - sp.fdm[3]) / (sp.fdm[4] - sp.fdm[3]);
    const double mb = sp.fdm[0] * (sp.fdm[1] * tp + 0.5 * sp.fdm[2] * tp * tp);
    const double f = std::exp(-mb) * (1.0 + mb);
    if (sp.fdm_on == FDM_INPUT)
      c *= f;
    else
      a *= f;
  }
  out[0] = a;
  out[1] = s;
  out[2] = c;
}

// out[3 b .. 3 b + 2] = a, s, c for the times t[b * stride], b < batch, read in their own type (a float, half or
// bfloat16 time widens to double exactly, as a float64 copy of the times would: the same coefficients, without
// that copy's dispatch and allocation). A time equal to the one before reuses its coefficients: a batch sharing
// one time (the public API's float t, a sampler's step) computes them once. NaN never equals itself, so a NaN
// time is computed, like every other, from its own value.
// The libm calls (four a sample for a VP schedule: expm1, log, exp, exp) are made stage by stage over a block of
// samples rather than sample by sample: each sample's calls form a dependent chain, and a loop of independent calls
// lets the CPU overlap them (measured 2026-12-01: 16 distinct times 1.3-1.5x faster). Every sample goes through the same
// operations in the same order as one at a time: the same bits.
template <typename T>
inline void times_coefficients(const ScheduleSpec& sp, const T* t, int64_t stride, int64_t batch, double* out) {
  constexpr int64_t kBlock = 16;
  const bool vp = is_vp(sp);
  double prev = 0.0;
  for (int64_t b0 = 0; b0 < batch; b0 += kBlock) {
    const int64_t rows = std::min(kBlock, batch - b0);
    double tv[kBlock], la[kBlock], ls[kBlock];
    int64_t row[kBlock];  // the row of each time computed here; the other rows repeat the row before them
    bool repeat[kBlock];
    int64_t m = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const double tb = static_cast<double>(t[(b0 + r) * stride]);
      repeat[r] = b0 + r > 0 && tb == prev;
      if (!repeat[r]) {
        tv[m] = tb;
        row[m++] = b0 + r;
      }
      prev = tb;
    }
    for (int64_t i = 0; i < m; ++i) la[i] = log_alpha(sp, tv[i]);
    if (vp) {
      for (int64_t i = 0; i < m; ++i) ls[i] = -std::expm1(2.0 * la[i]);
      for (int64_t i = 0; i < m; ++i) ls[i] = 0.5 * std::log(ls[i]);
    } else {
      for (int64_t i = 0; i < m; ++i) ls[i] = log_sigma_of_time(sp, tv[i]);
    }
    for (int64_t i = 0; i < m; ++i) finish_coefficients(sp, tv[i], la[i], ls[i], out + 3 * row[i]);
    for (int64_t r = 0; r < rows; ++r)
      if (repeat[r]) std::copy(out + 3 * (b0 + r - 1), out + 3 * (b0 + r), out + 3 * (b0 + r));
  }
}

}  // namespace tdiff
