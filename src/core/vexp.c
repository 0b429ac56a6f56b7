/* vexp.c - exp over arrays with the kernels' vector exp (vec.h: method and accuracy). */
#include "core/core.h"
#include "core/vec.h"

void ef_vexp(const float *x, float *y, size_t n) {
    size_t i = 0;
    for (; i + EF_VL <= n; i += EF_VL) vf_storeu(y + i, vf_exp(vf_loadu(x + i)));
    if (i < n) {
        float buf[EF_VL] __attribute__((aligned(64))) = {0};
        memcpy(buf, x + i, (n - i) * sizeof(float));
        vf_store(buf, vf_exp(vf_load(buf)));
        memcpy(y + i, buf, (n - i) * sizeof(float));
    }
}

void ef_vexp_shift(float *x, size_t n, float s, float c) {
    size_t i = 0;
    for (; i + EF_VL <= n; i += EF_VL) vf_storeu(x + i, vf_exp(vf_loadu(x + i) - s) * c);
    if (i < n) {
        float buf[EF_VL] __attribute__((aligned(64))) = {0};
        for (size_t t = i; t < n; t++) buf[t - i] = x[t] - s;
        vf_store(buf, vf_exp(vf_load(buf)) * c);
        memcpy(x + i, buf, (n - i) * sizeof(float));
    }
}

float ef_expf(float x) {
    float y;
    ef_vexp(&x, &y, 1);
    return y;
}
