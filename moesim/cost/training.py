"""Costs of a training step (``mode: train``, forward and backward) and of a plain
forward pass (``mode: inference``) of ``parallel.tokens_per_gpu`` tokens per GPU."""

from __future__ import annotations

from moesim.config.scenario import Scenario
from moesim.cost import compute
from moesim.cost.serving import expert_seconds
from moesim.cost.step import Cost, StepCosts


def mean_attention_seconds(m, hw, *, tokens: int, seq_len: int, **kwargs) -> float:
    """One attention layer's seconds averaged over the model's layers: those with a
    sliding window and the rest (:func:`moesim.cost.compute.attention_seconds`)."""
    windowed, window = compute.sliding_window_layers(m)
    full = compute.attention_seconds(m, hw, tokens=tokens, seq_len=seq_len, **kwargs)
    if not windowed:
        return full
    slid = compute.attention_seconds(m, hw, tokens=tokens, seq_len=seq_len, window=window,
                                     **kwargs)
    return (windowed * slid + (m.num_layers - windowed) * full) / m.num_layers


class TrainingCosts(StepCosts):
    """Data-parallel attention over each GPU's own tokens, routed experts over EP."""

    def __init__(self, scenario: Scenario, topology) -> None:
        super().__init__(scenario, topology)
        self.passes = (False, True) if scenario.mode == "train" else (False,)

    def routed_scenario(self) -> Scenario:
        return self.scenario

    def fixed(self) -> dict[tuple[str, bool], Cost]:
        m, p, hw = self.scenario.model, self.scenario.parallel, self.scenario.hardware
        tokens = p.tokens_per_gpu // p.micro_batches
        fixed: dict[tuple[str, bool], Cost] = {}
        for backward in self.passes:
            fixed["attention", backward] = mean_attention_seconds(
                m, hw, tokens=tokens, seq_len=p.seq_len, backward=backward), 0.0
            fixed["shared", backward] = compute.ffn_seconds(
                m, hw, tokens=tokens, intermediate=m.shared_experts * m.moe_intermediate_size,
                backward=backward), 0.0
            fixed["dense_ffn", backward] = compute.ffn_seconds(
                m, hw, tokens=tokens, intermediate=m.dense_intermediate_size,
                backward=backward), 0.0
            fixed["lm_head", backward] = compute.lm_head_seconds(
                m, hw, tokens=tokens, backward=backward), 0.0
        return fixed

    def experts(self, tokens_ge, received_g, *, backward):
        return expert_seconds(self.scenario, self.topology, tokens_ge, received_g,
                              backward=backward)

    def step_tokens(self) -> int:
        p = self.scenario.parallel
        return p.total_gpus * p.tokens_per_gpu

    def model_flops(self) -> float:
        m, p = self.scenario.model, self.scenario.parallel
        per_token = compute.model_flops_per_token(m, p.seq_len)
        return per_token * self.step_tokens() * (3 if self.train else 1)
