"""The op program every GPU runs in one step: two in-order CUDA-like streams.

The compute stream runs attention, shared experts, expert GEMMs, dense FFNs and the
LM head; the communication stream runs dispatch and combine. Each stream executes
its ops in program order; an op also waits for the ops it depends on. With two or
more micro-batches the order interleaves them, so one micro-batch's compute runs
while another's tokens travel, as in DeepSeek-V3's two-micro-batch overlap:

    compute: attn0 shared0 attn1 shared1 experts0 experts1 | attn0' ...
    comm:                dispatch0   dispatch1   combine0 combine1

Shared experts depend only on attention, so they also hide the dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

COMPUTE, COMM = "compute", "comm"


@dataclass(frozen=True, kw_only=True)
class Op:
    index: int
    phase: str  # attention, shared, experts, dispatch, combine, dense_ffn, lm_head
    layer: int  # model layer; the LM head counts as layer num_layers
    microbatch: int
    stream: str
    backward: bool
    deps: tuple[int, ...]

    @property
    def collective(self) -> bool:
        return self.stream == COMM


@dataclass
class _Builder:
    ops: list[Op] = field(default_factory=list)

    def add(self, phase, layer, mb, stream, deps, backward=False) -> int:
        index = len(self.ops)
        deps = tuple(d for d in deps if d is not None)
        self.ops.append(Op(index=index, phase=phase, layer=layer, microbatch=mb,
                           stream=stream, backward=backward, deps=deps))
        return index


def build_program(
    *, num_layers: int, first_dense_layers: int, micro_batches: int, train: bool
) -> list[Op]:
    """Ops of one step in program order (forward, then backward when ``train``)."""
    b = _Builder()
    mbs = range(micro_batches)
    ready: list[tuple[int | None, ...]] = [(None,) for _ in mbs]  # what the next layer needs
    for layer in range(num_layers):
        if layer < first_dense_layers:
            for m in mbs:
                a = b.add("attention", layer, m, COMPUTE, ready[m])
                ready[m] = (b.add("dense_ffn", layer, m, COMPUTE, (a,)),)
            continue
        attn, shared, disp, experts = {}, {}, {}, {}
        for m in mbs:
            attn[m] = b.add("attention", layer, m, COMPUTE, ready[m])
            shared[m] = b.add("shared", layer, m, COMPUTE, (attn[m],))
            disp[m] = b.add("dispatch", layer, m, COMM, (attn[m],))
        for m in mbs:
            experts[m] = b.add("experts", layer, m, COMPUTE, (disp[m],))
        for m in mbs:
            combine = b.add("combine", layer, m, COMM, (experts[m],))
            ready[m] = (combine, shared[m])
    head = {m: b.add("lm_head", num_layers, m, COMPUTE, ready[m]) for m in mbs}
    if not train:
        return b.ops

    grad = {m: (b.add("lm_head", num_layers, m, COMPUTE, (head[m],), backward=True),) for m in mbs}
    for layer in reversed(range(num_layers)):
        if layer < first_dense_layers:
            for m in mbs:
                f = b.add("dense_ffn", layer, m, COMPUTE, grad[m], backward=True)
                grad[m] = (b.add("attention", layer, m, COMPUTE, (f,), backward=True),)
            continue
        comb, shared, experts, disp = {}, {}, {}, {}
        for m in mbs:
            comb[m] = b.add("combine", layer, m, COMM, grad[m], backward=True)
            shared[m] = b.add("shared", layer, m, COMPUTE, grad[m], backward=True)
        for m in mbs:
            experts[m] = b.add("experts", layer, m, COMPUTE, (comb[m],), backward=True)
        for m in mbs:
            disp[m] = b.add("dispatch", layer, m, COMM, (experts[m],), backward=True)
        for m in mbs:
            grad[m] = (b.add("attention", layer, m, COMPUTE, (disp[m], shared[m]),
                             backward=True),)
    return b.ops
