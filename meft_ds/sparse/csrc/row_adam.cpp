// Row-sparse AdamW on a row-major CPU store, in place, in one call.
//
// Each selected row is updated by DeepSpeed's CPU Adam kernel (Adam_Optimizer::Step_4,
// compiled here from the installed DeepSpeed's own source: its built op keeps the kernel
// inlined, with no symbol to link to) directly on the store's memory: the row's weights
// and moments at store row rows[i], its gradient at grads row i, with the bias correction
// of the row's own step count. No gather, no scatter, no per-row Python call.
//
// - Step counts: the store's per-row counts are incremented here (after every row index
//   is checked, so a refused call changes nothing). Done from Python, the index ops cost
//   about as much as the kernel itself at 1% of the rows.
// - Threads: rows are split over as many threads as torch's intra-op setting
//   (at::get_num_threads()) allows, in one OpenMP region (see GOMP_parallel below). This
//   file is built without -fopenmp, so the kernel's own "omp parallel for" is compiled out.
// - Span 4 (Step_4), not DeepSpeed's usual span 8: compiled inline here, span 8 holds 32
//   vector registers of data plus the constants and spills every iteration, which cost
//   ~1.5x on rows not in cache. The arithmetic is elementwise and identical at either
//   span (same SIMD ops, same scalar tail), so results equal DeepSpeed's Step_8 bit for
//   bit (tested).

#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <algorithm>
#include <cstdint>
#include <functional>
#include "cpu_adam.h"
#include "cpu_adam_impl.cpp"  // DeepSpeed: csrc/adam, the kernel's template definitions

// An OpenMP parallel region without -fopenmp: the entry point GCC emits for
// "#pragma omp parallel", resolved, like DeepSpeed's own cpu_adam op, in the libgomp torch
// loads. So the rows run on the same (warm, spinning) OpenMP threads as torch's ops and
// DeepSpeed's kernel, not on threads that compete with them; and the kernel's own per-row
// pragma stays compiled out (with -fopenmp, each row's serialized region cost ~30% of the
// row's update in bench/sparse_adam.py).
extern "C" {
void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
int omp_get_thread_num();
int omp_get_num_threads();
}

namespace {

// Rows [0, n) split evenly over the region's threads.
struct Chunks {
    const std::function<void(int64_t, int64_t)>* update;
    int64_t n;

    static void run(void* self)
    {
        const auto* c = static_cast<const Chunks*>(self);
        const int64_t threads = omp_get_num_threads();
        const int64_t chunk = (c->n + threads - 1) / threads;
        const int64_t begin = std::min(c->n, omp_get_thread_num() * chunk);
        (*c->update)(begin, std::min(c->n, begin + chunk));
    }
};

void check_store(const torch::Tensor& t, const char* name)
{
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous() &&
                    t.dim() == 2,
                name,
                " must be a contiguous 2-D fp32 CPU tensor");
}

}  // namespace

void row_adam_step(torch::Tensor& params,
                   torch::Tensor& exp_avg,
                   torch::Tensor& exp_avg_sq,
                   const torch::Tensor& grads,
                   const torch::Tensor& rows,
                   torch::Tensor& steps,
                   double lr,
                   double beta1,
                   double beta2,
                   double eps,
                   double weight_decay,
                   int64_t parallel_min_elements)
{
    check_store(params, "params");
    check_store(exp_avg, "exp_avg");
    check_store(exp_avg_sq, "exp_avg_sq");
    check_store(grads, "grads");
    TORCH_CHECK(exp_avg.sizes() == params.sizes() && exp_avg_sq.sizes() == params.sizes(),
                "moments must have the store's shape");
    const int64_t n = rows.numel();
    const int64_t width = params.size(1);
    const int64_t store_rows = params.size(0);
    TORCH_CHECK(rows.device().is_cpu() && steps.device().is_cpu() &&
                    rows.scalar_type() == torch::kInt64 && steps.scalar_type() == torch::kInt64 &&
                    rows.is_contiguous() && steps.is_contiguous() && rows.dim() == 1 &&
                    steps.dim() == 1 && steps.numel() == store_rows,
                "rows and steps must be contiguous int64 CPU vectors, steps one per store row");
    TORCH_CHECK(grads.size(0) == n && grads.size(1) == width, "grads must be [len(rows), width]");
    const int64_t* row = rows.data_ptr<int64_t>();
    int64_t* step = steps.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
        TORCH_CHECK(row[i] >= 0 && row[i] < store_rows, "row index out of range");
        TORCH_CHECK(step[row[i]] >= 0, "row step counts are not negative");
    }
    for (int64_t i = 0; i < n; ++i) ++step[row[i]];
    float* p = params.data_ptr<float>();
    float* m = exp_avg.data_ptr<float>();
    float* v = exp_avg_sq.data_ptr<float>();
    float* g = const_cast<float*>(grads.data_ptr<float>());
    const std::function<void(int64_t, int64_t)> update = [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            Adam_Optimizer opt(lr, beta1, beta2, eps, weight_decay, /*adamw_mode=*/true);
            opt.IncrementStep(static_cast<size_t>(step[row[i]]), beta1, beta2);
            opt.update_state(lr, eps, weight_decay, /*bias_correction=*/true);
            const int64_t at = row[i] * width;
            opt.Step_4(p + at, g + i * width, m + at, v + at, width, /*parallel=*/false);
        }
    };
    // Each thread gets at least parallel_min_elements; small steps stay on this thread.
    const int64_t threads = std::max<int64_t>(
        1,
        std::min<int64_t>(at::get_num_threads(),
                          n * width / std::max<int64_t>(parallel_min_elements, 1)));
    if (threads == 1) {
        update(0, n);
        return;
    }
    Chunks chunks{&update, n};
    GOMP_parallel(&Chunks::run, &chunks, static_cast<unsigned>(threads), 0);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module)
{
    module.def("row_adam_step",
               &row_adam_step,
               "Row-sparse AdamW in place with DeepSpeed's CPU Adam kernel",
               pybind11::call_guard<pybind11::gil_scoped_release>());
}
