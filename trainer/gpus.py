"""The GPUs `lvd plan` knows: memory and dense peak FLOP/s (vendor data sheets, no sparsity)."""

from __future__ import annotations

GPUS: dict[str, dict[str, float]] = {
    "h100": {"memory_gb": 80, "bf16_tflops": 989, "fp32_tflops": 67},
    "h200": {"memory_gb": 141, "bf16_tflops": 989, "fp32_tflops": 67},
    "a100": {"memory_gb": 80, "bf16_tflops": 312, "fp32_tflops": 19.5},
}
