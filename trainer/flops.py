"""Counting a training step's floating-point operations, for the bench's share of the matmul ceiling
(docs/benchmarks.md)."""

from __future__ import annotations

import torch


class StepFlops:
    """Counts the floating-point operations of one optimizer step with torch's FlopCounterMode (matmuls,
    convolutions and attention, forward and backward; element-wise ops count as none). The counting
    slows that step down, so benchmarks count a step they do not time."""

    def __init__(self, step: int | None):
        self.step = step
        self.mode = None

    def start(self, step: int) -> None:
        if step == self.step:
            from torch.utils import flop_counter

            aten = torch.ops.aten
            # CPU attention is its own op, which FlopCounterMode does not know: the same formulas as CUDA's.
            cpu_attention = {
                aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, out_shape=None, **__: flop_counter.sdpa_flop_count(q, k, v),
                aten._scaled_dot_product_flash_attention_for_cpu_backward:
                    lambda grad, q, k, v, *_, out_shape=None, **__: flop_counter.sdpa_backward_flop_count(grad, q, k, v),
            }
            self.mode = flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_attention)
            self.mode.__enter__()

    def stop(self) -> int | None:
        """The count, when the step just ended was the counted one."""
        if self.mode is None:
            return None
        self.mode.__exit__(None, None, None)
        total, self.mode = self.mode.get_total_flops(), None
        return total
