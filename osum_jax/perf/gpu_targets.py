"""GPU target descriptions for compiling without a GPU (``GpuTargetConfigProto`` in protobuf text format).

The jax CUDA plugin compiles for the GPU these describe (``osum-train --plan --target cuda:h100:8``). Each entry
holds the facts the compiler uses: streaming multiprocessors, shared memory and register limits, HBM size and
bandwidth, L2, clock, compute capability, and the cuDNN version it may assume. The figures are the vendors'
device properties (as ``cudaGetDeviceProperties`` reports them on that GPU).
"""

from __future__ import annotations

# name -> (device name, SMs, HBM bytes, HBM bytes/s, L2 bytes, SM clock GHz, memory clock GHz,
#          compute capability, shared memory per SM, opt-in shared memory per block)
GPUS = {
    "h100": ("NVIDIA H100 80GB HBM3", 132, 84_942_979_072, 3_352_320_000_000, 52_428_800, 1.98, 2.619, (9, 0),
             233_472, 232_448),
    "h200": ("NVIDIA H200 141GB HBM3e", 132, 151_397_597_184, 4_800_000_000_000, 52_428_800, 1.98, 3.75, (9, 0),
             233_472, 232_448),
    "a100": ("NVIDIA A100-SXM4-80GB", 108, 85_198_045_184, 2_039_000_000_000, 41_943_040, 1.41, 1.593, (8, 0),
             167_936, 166_912),
}


def target_config(name: str) -> str:
    """The ``GpuTargetConfigProto`` text for GPU ``name`` (a key of :data:`GPUS`)."""
    dev, sms, mem, bw, l2, clock, mem_clock, (major, minor), smem_sm, smem_optin = GPUS[name]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {smem_sm}
  threads_per_core_limit: 2048
  core_count: {sms}
  fpus_per_core: {128 if major >= 9 else 64}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bw}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock}
  device_memory_size: {mem}
  shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  device_vendor: "NVIDIA Corporation"
  platform_version: "Compute Capability {major}.{minor}"
  name: "{dev}"
  device_address_bits: 64
  dnn_version: "9.10.0"
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 10
  patch: 0
}}
device_description_str: "{dev}"
"""
