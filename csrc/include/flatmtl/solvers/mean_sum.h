// Mean and Sum (reference/mean_sum.py): constant weights 1/K and 1.
#pragma once

#include "flatmtl/solvers/common.h"

namespace flatmtl::solvers {

struct Mean {
  FLATMTL_HD static int64_t work_size(int) { return 0; }
  FLATMTL_HD Status operator()(const double*, int K, double* w, double*) const {
    for (int i = 0; i < K; ++i) w[i] = 1.0 / K;
    return {0, 1};
  }
};

struct Sum {
  FLATMTL_HD static int64_t work_size(int) { return 0; }
  FLATMTL_HD Status operator()(const double*, int K, double* w, double*) const {
    for (int i = 0; i < K; ++i) w[i] = 1.0;
    return {0, 1};
  }
};

}  // namespace flatmtl::solvers
