"""GPU checks: ttt-gpu-check (check.py), the sm_90 compile report of the scan kernels, the step profiler."""
