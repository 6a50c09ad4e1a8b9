"""numba kernels (CPU). numba has no float16: half-precision data is viewed as uint16 for data movement."""
