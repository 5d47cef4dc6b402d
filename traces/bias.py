"""DeepSeek-V3 auxiliary-loss-free balancing: the selection-bias update.

After each training step ``b_e <- b_e + gamma * sign(mean(load) - load_e)``: an
overloaded expert's bias goes down, an underloaded one's up, an exactly balanced
one stays (docs/routing.md section 3.3). The load counts the final routing
(after any dropping) over the whole global batch, which the caller gathers.
"""

from __future__ import annotations

import torch

from moesim.errors import InputError


def update_bias(bias_e: torch.Tensor, load_e: torch.Tensor, *, rate: float) -> torch.Tensor:
    """New bias [E] (bias dtype, no grad) from the tokens per expert ``load_e`` [E].

    ``sign(mean - load_e)`` is taken as ``sign(sum(load) - E * load_e)``, which is
    exact for integer loads, so an exactly balanced expert never moves.
    """
    if rate < 0:
        raise InputError(f"bias rate {rate}", field="bias_rate", allowed=">= 0")
    if load_e.shape != bias_e.shape:
        raise InputError(
            f"load has shape {tuple(load_e.shape)}, bias {tuple(bias_e.shape)}",
            field="load_e",
            allowed="one count per expert",
        )
    load_e = load_e.detach()
    if not load_e.is_floating_point():
        load_e = load_e.long()
    direction_e = torch.sign(load_e.sum() - load_e.numel() * load_e)
    return (bias_e.detach() + rate * direction_e.to(bias_e.dtype)).to(bias_e.dtype)
