"""XLA settings for the tests' processes: fake CPU devices, and fast compiles.

The tests' programs are tiny, so their time is almost all XLA compiling them, and
most of that is LLVM optimising the CPU code. The tests turn LLVM's optimisation
down (`--xla_backend_optimization_level=0`, `--xla_llvm_disable_expensive_passes`):
XLA's own (HLO) passes (fusion, SPMD partitioning, the collectives) run as they
do for users; only the machine code is less tuned. Measured on test_steps +
test_t5_scan + test_cli_errors, side by side: 330 -> 223 CPU seconds.
Runs of users and benchmarks keep XLA's defaults.
"""

FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                      "--xla_llvm_disable_expensive_passes=true")


def xla_flags(device_count: int) -> str:
  """XLA_FLAGS for a test process with `device_count` fake CPU devices."""
  return " ".join([f"--xla_force_host_platform_device_count={device_count}",
                   *FAST_COMPILE_FLAGS])


def with_fast_compile(flags: str) -> str:
  """`flags` (an XLA_FLAGS value) plus the fast-compile flags it does not set."""
  names = {flag.split("=")[0] for flag in flags.split()}
  return " ".join([flags, *(f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in names)])
