/* rmlx: replaces mlx-c's mlx/c/half.h when building on x86-64.
 * Upstream defines float16_t/bfloat16_t only on ARM, which drops
 * mlx_array_item_float16 and friends from the C API (and mlx-rs needs them).
 * Here they are 16-bit storage types with the same size and alignment;
 * callers reinterpret the bits (mlx-rs does, through the `half` crate). */
#ifndef MLX_HALF_H
#define MLX_HALF_H

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__ARM_FEATURE_FP16_SCALAR_ARITHMETIC) || defined(__aarch64__)
#define HAS_FLOAT16
#include <arm_fp16.h>
typedef __fp16 float16_t;
#elif defined(__clang__)
/* clang (and so bindgen) accepts __fp16 as a storage-only type on every
 * target; mlx-rs expects the binding's __BindgenFloat16 newtype. */
#define HAS_FLOAT16
typedef __fp16 float16_t;
#else
/* GCC on x86-64: same size and alignment; only pointers to it cross the C API. */
#define HAS_FLOAT16
#include <stdint.h>
typedef uint16_t float16_t;
#endif

#if defined(__ARM_FEATURE_BF16) || defined(__aarch64__)
#define HAS_BFLOAT16
#include <arm_bf16.h>
typedef __bf16 bfloat16_t;
#else
#define HAS_BFLOAT16
#include <stdint.h>
typedef uint16_t bfloat16_t;
#endif

#ifdef __cplusplus
}
#endif

#endif
