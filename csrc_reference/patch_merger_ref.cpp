// Independent C++ reference of the PatchMerger: forward and backward as plain loops.
//
// Why this file exists: the Triton kernels are checked against pm_kernels/reference.py, which is
// itself built from PyTorch ops (layer_norm, matmul, softmax, autograd). A second oracle that
// shares none of that code (no ATen math, only raw pointers and the standard library) catches
// errors that both PyTorch-based paths would share, e.g. a misunderstanding of a convention.
// Every quantity is accumulated in double, so at float64 it agrees with the PyTorch reference to
// ~1e-12 and at float32 it is more accurate than any float32 implementation it is compared with.
//
// Shapes (the Python wrapper flattens the leading dims of x into B and makes everything
// contiguous): x (B, N, D), queries W (M, D), weight g (D), bias b (D), mask (B, N) bool with
// true = keep, dy (B, M, D).
//
// Forward, per batch element:
//   mu[n]    = mean_d x[n,d]                         two-pass: mean first, then the variance of
//   var[n]   = mean_d (x[n,d] - mu[n])^2             the centred values, which has no
//   rstd[n]  = 1 / sqrt(var[n] + eps)                catastrophic cancellation (E[x^2] - E[x]^2
//   xhat     = (x - mu) * rstd                       loses every digit when |mean| >> std)
//   xn       = xhat * g + b
//   s[m,n]   = scale * <W[m,:], xn[n,:]>,  -inf where mask[n] is false
//   p[m,:]   = softmax_n s[m,:];  p[m,:] = 0 when no token of the row is kept (or N == 0)
//   y[m,:]   = sum_n p[m,n] xn[n,:]
//
// Backward (everything is recomputed from x; nothing is saved by the forward):
//   dp[m,n]  = <dy[m,:], xn[n,:]>
//   Delta[m] = sum_n p[m,n] dp[m,n]                  softmax Jacobian: ds = p * (dp - Delta)
//   ds[m,n]  = p[m,n] (dp[m,n] - Delta[m])           (0 wherever p is 0: masked tokens, empty rows)
//   dxn[n,:] = sum_m p[m,n] dy[m,:] + scale * ds[m,n] W[m,:]   (xn feeds both y and s)
//   dW[m,:]  = scale * sum_{b,n} ds[m,n] xn[n,:]
//   dg[d]    = sum_{b,n} dxn[n,d] xhat[n,d],   db[d] = sum_{b,n} dxn[n,d]
//   dxhat    = dxn * g
//   dx[n,:]  = rstd[n] (dxhat - mean_d dxhat - xhat * mean_d(dxhat * xhat))   LayerNorm Jacobian
//
// Parallelism: at::parallel_for over the batch. The parameter gradients are sums over the batch;
// they are accumulated per fixed-size chunk of the batch and the chunk partials are added in chunk
// order, so the result is bitwise identical whatever the number of threads.
//
// Compiled without -ffast-math on purpose: it would let the compiler reassociate the double
// sums (changing results with the vector width) and assume that -inf never occurs.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace {

// Sizes of one call; the per-batch-element routines below all read from it.
struct Dims {
  int64_t batch = 0;   // B: product of x's leading dims
  int64_t tokens = 0;  // N
  int64_t dim = 0;     // D
  int64_t queries = 0; // M
};

// The parameters of the op, widened to double once per call. `weight` / `bias` hold the LayerNorm
// affine (ones / zeros when the caller passed None).
struct Params {
  std::vector<double> queries;  // (M, D)
  std::vector<double> weight;   // (D)
  std::vector<double> bias;     // (D)
  double eps = 0.0;
  double scale = 0.0;
};

// Per-batch-element buffers, in double, allocated once per parallel chunk and reused.
struct Workspace {
  std::vector<double> xhat;  // (N, D) normalised x, before the affine
  std::vector<double> xn;    // (N, D) LayerNorm output
  std::vector<double> rstd;  // (N)
  std::vector<double> p;     // (M, N) merge weights
  std::vector<double> row;   // (D) scratch: one output row

  explicit Workspace(const Dims& d)
      : xhat(d.tokens * d.dim), xn(d.tokens * d.dim), rstd(d.tokens), p(d.queries * d.tokens),
        row(d.dim) {}
};

template <typename scalar_t>
std::vector<double> to_double(const at::Tensor& t) {
  const scalar_t* src = t.data_ptr<scalar_t>();
  return std::vector<double>(src, src + t.numel());
}

template <typename scalar_t>
Params make_params(const at::Tensor& queries, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& bias, int64_t dim, double eps, double scale) {
  Params prm;
  prm.queries = to_double<scalar_t>(queries);
  prm.weight = weight ? to_double<scalar_t>(*weight) : std::vector<double>(dim, 1.0);
  prm.bias = bias ? to_double<scalar_t>(*bias) : std::vector<double>(dim, 0.0);
  prm.eps = eps;
  prm.scale = scale;
  return prm;
}

double dot(const double* a, const double* b, int64_t n) {
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// acc[i] += alpha * v[i]
void axpy(double alpha, const double* v, double* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += alpha * v[i];
}

// LayerNorm of the N rows of one batch element: fills ws.xhat, ws.xn and ws.rstd.
template <typename scalar_t>
void layer_norm(const scalar_t* x, const Dims& d, const Params& prm, Workspace& ws) {
  const int64_t D = d.dim;
  for (int64_t n = 0; n < d.tokens; ++n) {
    const scalar_t* xr = x + n * D;
    double mean = 0.0;
    for (int64_t k = 0; k < D; ++k) mean += static_cast<double>(xr[k]);
    mean /= static_cast<double>(D);
    double var = 0.0;  // biased (divide by D), as LayerNorm defines it
    for (int64_t k = 0; k < D; ++k) {
      const double c = static_cast<double>(xr[k]) - mean;
      var += c * c;
    }
    var /= static_cast<double>(D);
    const double rstd = 1.0 / std::sqrt(var + prm.eps);
    ws.rstd[n] = rstd;
    double* xh = ws.xhat.data() + n * D;
    double* xo = ws.xn.data() + n * D;
    for (int64_t k = 0; k < D; ++k) {
      xh[k] = (static_cast<double>(xr[k]) - mean) * rstd;
      xo[k] = xh[k] * prm.weight[k] + prm.bias[k];
    }
  }
}

// Merge weights p (M, N) of one batch element from ws.xn. `keep` is null when there is no mask.
// Softmax over the tokens, shifted by the row maximum over the kept tokens so that exp never
// overflows; masked tokens are skipped rather than set to -inf, and a row with no kept token is
// all zeros (the convention of the op: y = 0 and no gradient, never NaN).
void merge_weights(const bool* keep, const Dims& d, const Params& prm, Workspace& ws) {
  const int64_t N = d.tokens, D = d.dim;
  for (int64_t m = 0; m < d.queries; ++m) {
    const double* w = prm.queries.data() + m * D;
    double* p = ws.p.data() + m * N;
    double row_max = -std::numeric_limits<double>::infinity();
    bool any_kept = false;
    for (int64_t n = 0; n < N; ++n) {
      if (keep && !keep[n]) {
        p[n] = 0.0;
        continue;
      }
      p[n] = prm.scale * dot(w, ws.xn.data() + n * D, D);  // the score s[m,n], for now
      row_max = any_kept ? std::max(row_max, p[n]) : p[n];
      any_kept = true;
    }
    if (!any_kept) continue;  // p[m,:] is already all zeros
    double total = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      if (keep && !keep[n]) continue;
      p[n] = std::exp(p[n] - row_max);
      total += p[n];
    }
    // total >= 1: the maximum contributes exp(0).
    for (int64_t n = 0; n < N; ++n) p[n] /= total;
  }
}

// Split [0, B) into at most kMaxChunks contiguous chunks whose boundaries depend only on B, never
// on the thread count: the backward reduces its parameter gradients per chunk, in chunk order.
constexpr int64_t kMaxChunks = 64;

struct Chunking {
  int64_t size = 1;   // batch elements per chunk
  int64_t count = 0;  // number of chunks

  explicit Chunking(int64_t batch) {
    if (batch > 0) {
      size = (batch + kMaxChunks - 1) / kMaxChunks;
      count = (batch + size - 1) / size;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Argument checks shared by forward and backward. The Python wrapper already guarantees all of
// this; the checks make the ops safe to call directly through torch.ops as well.

void check_float_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                        at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, " (the dtype of x), got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

Dims check_inputs(const at::Tensor& x, const at::Tensor& queries,
                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(x.dim() == 3, "x must be 3-D (B, N, D), got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(queries.dim() == 2, "queries must be 2-D (M, D)");
  Dims d;
  d.batch = x.size(0);
  d.tokens = x.size(1);
  d.dim = x.size(2);
  d.queries = queries.size(0);
  TORCH_CHECK(d.dim > 0, "the feature dim D must be positive");
  const auto dtype = x.scalar_type();
  check_float_tensor(x, "x", dtype, {d.batch, d.tokens, d.dim});
  check_float_tensor(queries, "queries", dtype, {d.queries, d.dim});
  if (weight) check_float_tensor(*weight, "weight", dtype, {d.dim});
  if (bias) check_float_tensor(*bias, "bias", dtype, {d.dim});
  if (mask) {
    TORCH_CHECK(mask->device().is_cpu(), "mask must be a CPU tensor");
    TORCH_CHECK(mask->scalar_type() == at::kBool, "mask must be bool");
    TORCH_CHECK(mask->sizes() == at::IntArrayRef({d.batch, d.tokens}), "mask must have shape ",
                at::IntArrayRef({d.batch, d.tokens}), ", got ", mask->sizes());
    TORCH_CHECK(mask->is_contiguous(), "mask must be contiguous");
  }
  return d;
}

// ---------------------------------------------------------------------------------------------
// Forward: y (B, M, D) in the dtype of x.

template <typename scalar_t>
void forward_impl(const at::Tensor& x, const std::optional<at::Tensor>& mask, const Dims& d,
                  const Params& prm, at::Tensor& y) {
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  const bool* mask_ptr = mask ? mask->data_ptr<bool>() : nullptr;
  scalar_t* y_ptr = y.data_ptr<scalar_t>();
  const int64_t N = d.tokens, D = d.dim, M = d.queries;

  at::parallel_for(0, d.batch, /*grain_size=*/1, [&](int64_t begin, int64_t end) {
    Workspace ws(d);
    for (int64_t b = begin; b < end; ++b) {
      const bool* keep = mask_ptr ? mask_ptr + b * N : nullptr;
      layer_norm(x_ptr + b * N * D, d, prm, ws);
      merge_weights(keep, d, prm, ws);
      for (int64_t m = 0; m < M; ++m) {
        std::fill(ws.row.begin(), ws.row.end(), 0.0);
        const double* p = ws.p.data() + m * N;
        for (int64_t n = 0; n < N; ++n) {
          if (p[n] != 0.0) axpy(p[n], ws.xn.data() + n * D, ws.row.data(), D);
        }
        scalar_t* out = y_ptr + (b * M + m) * D;
        for (int64_t k = 0; k < D; ++k) out[k] = static_cast<scalar_t>(ws.row[k]);
      }
    }
  });
}

at::Tensor patch_merger_forward(const at::Tensor& x, const at::Tensor& queries,
                                const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& mask, double eps, double scale) {
  const Dims d = check_inputs(x, queries, weight, bias, mask);
  at::Tensor y = at::empty({d.batch, d.queries, d.dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "patch_merger_ref_forward", [&] {
    const Params prm = make_params<scalar_t>(queries, weight, bias, d.dim, eps, scale);
    forward_impl<scalar_t>(x, mask, d, prm, y);
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// Backward: (dx, dqueries, dweight, dbias), all in the dtype of x. dweight / dbias are always
// computed (they are cheap); the Python wrapper drops them when weight / bias was None.

// Parameter-gradient partial sums of one chunk of the batch: dW (M, D), then dg (D), then db (D).
struct ParamGrads {
  double* dW;
  double* dg;
  double* db;
};

template <typename scalar_t>
void backward_one(const scalar_t* x, const scalar_t* dy, const bool* keep, const Dims& d,
                  const Params& prm, Workspace& ws, std::vector<double>& dy_d,
                  std::vector<double>& ds, ParamGrads acc, scalar_t* dx) {
  const int64_t N = d.tokens, D = d.dim, M = d.queries;
  layer_norm(x, d, prm, ws);
  merge_weights(keep, d, prm, ws);
  for (int64_t i = 0; i < M * D; ++i) dy_d[i] = static_cast<double>(dy[i]);

  // ds = p * (dp - Delta): the gradient of the scores (before `scale`).
  for (int64_t m = 0; m < M; ++m) {
    const double* p = ws.p.data() + m * N;
    double* dsr = ds.data() + m * N;
    double delta = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      dsr[n] = p[n] != 0.0 ? dot(dy_d.data() + m * D, ws.xn.data() + n * D, D) : 0.0;  // dp
      delta += p[n] * dsr[n];
    }
    for (int64_t n = 0; n < N; ++n) dsr[n] = p[n] * (dsr[n] - delta);
  }

  // dW[m,:] += scale * sum_n ds[m,n] xn[n,:]
  for (int64_t m = 0; m < M; ++m) {
    double* dWr = acc.dW + m * D;
    for (int64_t n = 0; n < N; ++n) {
      const double g = prm.scale * ds[m * N + n];
      if (g != 0.0) axpy(g, ws.xn.data() + n * D, dWr, D);
    }
  }

  // Token by token: dxn, its contributions to dg / db, then the LayerNorm backward.
  double* dxn = ws.row.data();
  for (int64_t n = 0; n < N; ++n) {
    std::fill(ws.row.begin(), ws.row.end(), 0.0);
    for (int64_t m = 0; m < M; ++m) {
      const double pm = ws.p[m * N + n];
      const double sm = prm.scale * ds[m * N + n];
      if (pm != 0.0) axpy(pm, dy_d.data() + m * D, dxn, D);
      if (sm != 0.0) axpy(sm, prm.queries.data() + m * D, dxn, D);
    }
    const double* xh = ws.xhat.data() + n * D;
    double mean_dxhat = 0.0, mean_dxhat_xhat = 0.0;
    for (int64_t k = 0; k < D; ++k) {
      acc.dg[k] += dxn[k] * xh[k];
      acc.db[k] += dxn[k];
      const double dxhat = dxn[k] * prm.weight[k];
      mean_dxhat += dxhat;
      mean_dxhat_xhat += dxhat * xh[k];
    }
    mean_dxhat /= static_cast<double>(D);
    mean_dxhat_xhat /= static_cast<double>(D);
    const double rstd = ws.rstd[n];
    scalar_t* dxr = dx + n * D;
    for (int64_t k = 0; k < D; ++k) {
      const double dxhat = dxn[k] * prm.weight[k];
      dxr[k] = static_cast<scalar_t>(rstd * (dxhat - mean_dxhat - xh[k] * mean_dxhat_xhat));
    }
  }
}

template <typename scalar_t>
void backward_impl(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& mask,
                   const Dims& d, const Params& prm, at::Tensor& dx, at::Tensor& dqueries,
                   at::Tensor& dweight, at::Tensor& dbias) {
  const scalar_t* x_ptr = x.data_ptr<scalar_t>();
  const scalar_t* dy_ptr = dy.data_ptr<scalar_t>();
  const bool* mask_ptr = mask ? mask->data_ptr<bool>() : nullptr;
  scalar_t* dx_ptr = dx.data_ptr<scalar_t>();
  const int64_t N = d.tokens, D = d.dim, M = d.queries;

  const Chunking chunks(d.batch);
  const int64_t stride = M * D + 2 * D;  // one ParamGrads block
  std::vector<double> partials(chunks.count * stride, 0.0);

  at::parallel_for(0, chunks.count, /*grain_size=*/1, [&](int64_t c_begin, int64_t c_end) {
    Workspace ws(d);
    std::vector<double> dy_d(M * D), ds(M * N);
    for (int64_t c = c_begin; c < c_end; ++c) {
      double* block = partials.data() + c * stride;
      const ParamGrads acc{block, block + M * D, block + M * D + D};
      const int64_t b_end = std::min(d.batch, (c + 1) * chunks.size);
      for (int64_t b = c * chunks.size; b < b_end; ++b) {
        backward_one<scalar_t>(x_ptr + b * N * D, dy_ptr + b * M * D,
                               mask_ptr ? mask_ptr + b * N : nullptr, d, prm, ws, dy_d, ds, acc,
                               dx_ptr + b * N * D);
      }
    }
  });

  // Serial reduction over the chunks, in a fixed order.
  std::vector<double> total(stride, 0.0);
  for (int64_t c = 0; c < chunks.count; ++c) {
    const double* block = partials.data() + c * stride;
    for (int64_t i = 0; i < stride; ++i) total[i] += block[i];
  }
  scalar_t* dq = dqueries.data_ptr<scalar_t>();
  scalar_t* dg = dweight.data_ptr<scalar_t>();
  scalar_t* db = dbias.data_ptr<scalar_t>();
  for (int64_t i = 0; i < M * D; ++i) dq[i] = static_cast<scalar_t>(total[i]);
  for (int64_t k = 0; k < D; ++k) {
    dg[k] = static_cast<scalar_t>(total[M * D + k]);
    db[k] = static_cast<scalar_t>(total[M * D + D + k]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_merger_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& queries,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& mask, double eps, double scale) {
  const Dims d = check_inputs(x, queries, weight, bias, mask);
  check_float_tensor(dy, "dy", x.scalar_type(), {d.batch, d.queries, d.dim});
  at::Tensor dx = at::empty_like(x);
  at::Tensor dqueries = at::empty({d.queries, d.dim}, x.options());
  at::Tensor dweight = at::empty({d.dim}, x.options());
  at::Tensor dbias = at::empty({d.dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "patch_merger_ref_backward", [&] {
    const Params prm = make_params<scalar_t>(queries, weight, bias, d.dim, eps, scale);
    backward_impl<scalar_t>(dy, x, mask, d, prm, dx, dqueries, dweight, dbias);
  });
  return {dx, dqueries, dweight, dbias};
}

}  // namespace

// Registered as custom ops (torch.ops.pm_kernels_cpp_ref.*) rather than a pybind11 module: no
// Python headers are needed, which keeps the one-off build short.
TORCH_LIBRARY(pm_kernels_cpp_ref, m) {
  m.def("forward(Tensor x, Tensor queries, Tensor? weight, Tensor? bias, Tensor? mask, "
        "float eps, float scale) -> Tensor",
        &patch_merger_forward);
  m.def("backward(Tensor dy, Tensor x, Tensor queries, Tensor? weight, Tensor? bias, "
        "Tensor? mask, float eps, float scale) -> (Tensor, Tensor, Tensor, Tensor)",
        &patch_merger_backward);
}
