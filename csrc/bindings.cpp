// Python bindings of the native kernels. Arguments are raw addresses (Tensor.data_ptr()), sizes and
// strides; the Python layer (flatmtl_fast/primitives/native.py) validates every tensor first.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <vector>

#include "flatmtl/solvers_bindings.h"
#include "flatmtl/streaming.h"

namespace py = pybind11;
using flatmtl::DType;
using flatmtl::MatrixView;

namespace {

MatrixView view(uintptr_t data, int64_t rows, int64_t cols, int64_t row_stride, int dtype) {
  if (rows < 1 || cols < 1 || row_stride < cols || dtype < 0 || dtype > 2) {
    throw std::invalid_argument("flatmtl_fast._C: invalid matrix description");
  }
  return MatrixView{reinterpret_cast<const void*>(data), rows, cols, row_stride, DType(dtype)};
}

// A vector's element type code (a weight, a base or a direction), checked like the matrix's.
DType vector_dtype(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument("flatmtl_fast._C: invalid element type code");
  return DType(code);
}

void check_count(int64_t count) {
  if (count < 1) throw std::invalid_argument("flatmtl_fast._C: invalid vector length");
}

void check_buffer_stride(int64_t buffer_stride, int64_t cols) {
  if (buffer_stride < cols) throw std::invalid_argument("flatmtl_fast._C: invalid buffer row stride");
}

#ifdef FLATMTL_WITH_CUDA
void check_cuda(const std::string& error) {
  if (!error.empty()) throw std::runtime_error("flatmtl_fast CUDA backend: " + error);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "flatmtl_fast native kernels (CPU: OpenMP + SIMD; CUDA when built with nvcc)";

  m.def("cpu_isa", &flatmtl::cpu::isa, "Instruction set the CPU kernels use now.");
  m.def("cpu_supported_isas", &flatmtl::cpu::supported_isas, "Instruction sets this CPU supports, lowest first.");
  m.def("cpu_set_isa", &flatmtl::cpu::set_isa, py::arg("name"), "Force an instruction set (for tests).");

  m.def(
      "cpu_gram",
      [](uintptr_t G, int64_t K, int64_t N, int64_t row_stride, int dtype, uintptr_t out, int num_threads) {
        const MatrixView g = view(G, K, N, row_stride, dtype);
        py::gil_scoped_release release;
        flatmtl::cpu::gram(g, reinterpret_cast<double*>(out), num_threads);
      },
      py::arg("G"), py::arg("K"), py::arg("N"), py::arg("row_stride"), py::arg("dtype"), py::arg("out"),
      py::arg("num_threads"));

  m.def(
      "cpu_combine",
      [](uintptr_t w, bool w_is_double, uintptr_t G, int64_t K, int64_t N, int64_t row_stride, int dtype, uintptr_t out,
         int out_dtype, float alpha, bool accumulate, int num_threads) {
        const MatrixView g = view(G, K, N, row_stride, dtype);
        py::gil_scoped_release release;
        // A float64 w is rounded to float32 here (K values), as the caller's conversion would round it.
        std::vector<float> rounded(w_is_double ? size_t(K) : 0);
        for (int64_t k = 0; k < int64_t(rounded.size()); ++k) rounded[k] = float(reinterpret_cast<const double*>(w)[k]);
        flatmtl::cpu::combine(w_is_double ? rounded.data() : reinterpret_cast<const float*>(w), g,
                              reinterpret_cast<void*>(out), DType(out_dtype), alpha, accumulate, num_threads);
      },
      py::arg("w"), py::arg("w_is_double"), py::arg("G"), py::arg("K"), py::arg("N"), py::arg("row_stride"),
      py::arg("dtype"), py::arg("out"), py::arg("out_dtype"), py::arg("alpha"), py::arg("accumulate"),
      py::arg("num_threads"));

  m.def(
      "cpu_graddrop",
      [](uintptr_t G, int64_t K, int64_t N, int64_t row_stride, int dtype, uintptr_t leak, uint64_t seed,
         uintptr_t out, int out_dtype, int num_threads) {
        const MatrixView g = view(G, K, N, row_stride, dtype);
        py::gil_scoped_release release;
        flatmtl::cpu::graddrop(g, reinterpret_cast<const double*>(leak), seed, reinterpret_cast<void*>(out),
                               DType(out_dtype), num_threads);
      },
      py::arg("G"), py::arg("K"), py::arg("N"), py::arg("row_stride"), py::arg("dtype"), py::arg("leak"),
      py::arg("seed"), py::arg("out"), py::arg("out_dtype"), py::arg("num_threads"));

  m.def(
      "cpu_row_norms",
      [](uintptr_t G, int64_t K, int64_t N, int64_t row_stride, int dtype, uintptr_t weight, int weight_dtype,
         uintptr_t out, int num_threads) {
        const MatrixView g = view(G, K, N, row_stride, dtype);
        const DType wd = vector_dtype(weight_dtype);
        py::gil_scoped_release release;
        flatmtl::cpu::row_norms(g, reinterpret_cast<const void*>(weight), wd, reinterpret_cast<double*>(out),
                                num_threads);
      },
      py::arg("G"), py::arg("K"), py::arg("N"), py::arg("row_stride"), py::arg("dtype"), py::arg("weight"),
      py::arg("weight_dtype"), py::arg("out"), py::arg("num_threads"));

  m.def(
      "cpu_ema_row_norms",
      [](uintptr_t buffer, int64_t buffer_stride, uintptr_t G, int64_t K, int64_t N, int64_t row_stride, int dtype,
         uintptr_t decay, uintptr_t gain, uintptr_t out, int num_threads) {
        const MatrixView g = view(G, K, N, row_stride, dtype);
        check_buffer_stride(buffer_stride, N);
        py::gil_scoped_release release;
        flatmtl::cpu::ema_row_norms(reinterpret_cast<float*>(buffer), buffer_stride, g,
                                    reinterpret_cast<const float*>(decay),
                                    reinterpret_cast<const float*>(gain), reinterpret_cast<double*>(out), num_threads);
      },
      py::arg("buffer"), py::arg("buffer_stride"), py::arg("G"), py::arg("K"), py::arg("N"), py::arg("row_stride"),
      py::arg("dtype"), py::arg("decay"), py::arg("gain"), py::arg("out"), py::arg("num_threads"));

  m.def(
      "cpu_perturb",
      [](uintptr_t base, uintptr_t direction, int direction_dtype, uintptr_t scale, bool scale_is_double,
         uintptr_t out, int dtype, int64_t count, bool adaptive, int num_threads) {
        const DType dd = vector_dtype(direction_dtype);
        const DType od = vector_dtype(dtype);
        check_count(count);
        py::gil_scoped_release release;
        flatmtl::cpu::perturb(reinterpret_cast<const void*>(base), reinterpret_cast<const void*>(direction), dd,
                              reinterpret_cast<const void*>(scale), scale_is_double, reinterpret_cast<void*>(out), od,
                              count, adaptive, num_threads);
      },
      py::arg("base"), py::arg("direction"), py::arg("direction_dtype"), py::arg("scale"), py::arg("scale_is_double"),
      py::arg("out"), py::arg("dtype"), py::arg("count"), py::arg("adaptive"), py::arg("num_threads"));

#ifdef FLATMTL_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("cuda_device_count", []() {
    std::string error;
    const int count = flatmtl::cuda::device_count(&error);
    return py::make_tuple(count, error);
  });
  m.def("cuda_gram_num_splits", &flatmtl::cuda::gram_num_splits, py::arg("K"), py::arg("N"), py::arg("device"));
  m.def(
      "cuda_gram",
      [](uintptr_t G, int64_t K, int64_t N, int64_t row_stride, int dtype, uintptr_t partials, int64_t splits,
         uintptr_t out, bool out_is_double, int device, uintptr_t stream) {
        const MatrixView g = view(G, K, N, row_stride, dtype);
        check_cuda(flatmtl::cuda::gram(g, reinterpret_cast<float*>(partials), splits, reinterpret_cast<void*>(out),
                                       out_is_double, device, stream));
      },
      py::arg("G"), py::arg("K"), py::arg("N"), py::arg("row_stride"), py::arg("dtype"), py::arg("partials"),
      py::arg("splits"), py::arg("out"), py::arg("out_is_double"), py::arg("device"), py::arg("stream"));
  m.def(
      "cuda_combine",
      [](uintptr_t w, bool w_is_double, uintptr_t G, int64_t K, int64_t N, int64_t row_stride, int dtype, uintptr_t out,
         int out_dtype, float alpha, bool accumulate, int device, uintptr_t stream) {
        const MatrixView g = view(G, K, N, row_stride, dtype);
        check_cuda(flatmtl::cuda::combine(reinterpret_cast<const void*>(w), w_is_double, g,
                                          reinterpret_cast<void*>(out), DType(out_dtype), alpha, accumulate, device,
                                          stream));
      },
      py::arg("w"), py::arg("w_is_double"), py::arg("G"), py::arg("K"), py::arg("N"), py::arg("row_stride"),
      py::arg("dtype"), py::arg("out"), py::arg("out_dtype"), py::arg("alpha"), py::arg("accumulate"),
      py::arg("device"), py::arg("stream"));
  m.def("cuda_row_norms_num_splits", &flatmtl::cuda::row_norms_num_splits, py::arg("K"), py::arg("N"),
        py::arg("device"));
  m.def(
      "cuda_row_norms",
      [](uintptr_t G, int64_t K, int64_t N, int64_t row_stride, int dtype, uintptr_t weight, int weight_dtype,
         uintptr_t partials, int64_t splits, uintptr_t out, int device, uintptr_t stream) {
        const MatrixView g = view(G, K, N, row_stride, dtype);
        check_cuda(flatmtl::cuda::row_norms(g, reinterpret_cast<const void*>(weight), vector_dtype(weight_dtype),
                                            reinterpret_cast<double*>(partials), splits,
                                            reinterpret_cast<double*>(out), device, stream));
      },
      py::arg("G"), py::arg("K"), py::arg("N"), py::arg("row_stride"), py::arg("dtype"), py::arg("weight"),
      py::arg("weight_dtype"), py::arg("partials"), py::arg("splits"), py::arg("out"), py::arg("device"),
      py::arg("stream"));
  m.def(
      "cuda_ema_row_norms",
      [](uintptr_t buffer, int64_t buffer_stride, uintptr_t G, int64_t K, int64_t N, int64_t row_stride, int dtype,
         uintptr_t decay, uintptr_t gain, uintptr_t partials, int64_t splits, uintptr_t out, int device,
         uintptr_t stream) {
        const MatrixView g = view(G, K, N, row_stride, dtype);
        check_buffer_stride(buffer_stride, N);
        check_cuda(flatmtl::cuda::ema_row_norms(reinterpret_cast<float*>(buffer), buffer_stride, g,
                                                reinterpret_cast<const float*>(decay),
                                                reinterpret_cast<const float*>(gain),
                                                reinterpret_cast<double*>(partials), splits,
                                                reinterpret_cast<double*>(out), device, stream));
      },
      py::arg("buffer"), py::arg("buffer_stride"), py::arg("G"), py::arg("K"), py::arg("N"), py::arg("row_stride"),
      py::arg("dtype"), py::arg("decay"), py::arg("gain"), py::arg("partials"), py::arg("splits"), py::arg("out"),
      py::arg("device"), py::arg("stream"));
  m.def(
      "cuda_perturb",
      [](uintptr_t base, uintptr_t direction, int direction_dtype, uintptr_t scale, bool scale_is_double,
         uintptr_t out, int dtype, int64_t count, bool adaptive, int device, uintptr_t stream) {
        check_count(count);
        check_cuda(flatmtl::cuda::perturb(reinterpret_cast<const void*>(base), reinterpret_cast<const void*>(direction),
                                          vector_dtype(direction_dtype), reinterpret_cast<const void*>(scale),
                                          scale_is_double, reinterpret_cast<void*>(out), vector_dtype(dtype), count,
                                          adaptive, device, stream));
      },
      py::arg("base"), py::arg("direction"), py::arg("direction_dtype"), py::arg("scale"), py::arg("scale_is_double"),
      py::arg("out"), py::arg("dtype"), py::arg("count"), py::arg("adaptive"), py::arg("device"), py::arg("stream"));
#else
  m.attr("with_cuda") = false;
#endif
  flatmtl::bind_solvers(m);
}
