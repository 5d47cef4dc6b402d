"""Checks that a scenario can run on its topology, each naming the field at fault."""

from __future__ import annotations

from moesim.config.scenario import SERVING_MODES, Scenario
from moesim.errors import InputError


def divisors(n: int) -> str:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, divs))


def whole_batch(scenario: Scenario) -> bool:
    """Whether ``training.global_batch`` sets the batch (it does in ``mode: train``)."""
    return scenario.mode == "train" and scenario.training.global_batch is not None


def check_model(scenario: Scenario) -> None:
    m = scenario.model
    if m.first_dense_layers >= m.num_layers:
        raise InputError(
            f"{m.first_dense_layers} dense layers leave no MoE layer of {m.num_layers}",
            field="model.first_dense_layers", allowed=f"0..{m.num_layers - 1}",
        )
    if m.top_k > m.routed_experts:
        raise InputError(
            f"top_k {m.top_k} exceeds the {m.routed_experts} routed experts",
            field="model.top_k", allowed=f"1..{m.routed_experts}",
        )
    if m.first_dense_layers and not m.dense_intermediate_size:
        raise InputError(
            "dense layers need a dense FFN width", field="model.dense_intermediate_size",
            allowed="a positive integer",
        )
    if m.sliding_window_layers > m.num_layers:
        raise InputError(
            f"{m.sliding_window_layers} sliding-window layers exceed the {m.num_layers} layers",
            field="model.sliding_window_layers", allowed=f"0..{m.num_layers}")
    if m.sliding_window_layers and m.sliding_window is None:
        raise InputError("sliding-window layers need a window", field="model.sliding_window",
                         allowed="a positive number of tokens")
    needed = {
        "mla": ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"),
        "gqa": ("num_kv_heads", "head_dim"),
        "mha": ("head_dim",),
    }[m.attention]
    for name in needed:
        if getattr(m, name) is None:
            raise InputError(
                f"{m.attention} attention needs {name}", field=f"model.{name}",
                allowed="a positive integer",
            )


def check_mode(scenario: Scenario) -> None:
    """The sections a mode needs: ``tokens_per_gpu`` for train and inference, ``serving``
    (and no ``tokens_per_gpu``) for prefill and decode; tensor parallelism only in the
    serving modes."""
    p, mode = scenario.parallel, scenario.mode
    if mode in SERVING_MODES:
        if scenario.serving is None:
            raise InputError(
                f"mode {mode} needs the serving section (the request batch)", field="serving",
                allowed="a mapping {batch: requests per attention-DP rank, isl: N, osl: N, "
                        "kv_dtype: bf16 | fp8}")
        if p.tokens_per_gpu is not None:
            raise InputError(
                f"in mode {mode} the tokens per GPU follow from serving.batch and serving.isl",
                field="parallel.tokens_per_gpu", allowed="null (leave it out)")
        return
    if scenario.serving is not None:
        raise InputError(
            f"mode {mode} takes no serving section (only prefill and decode do)",
            field="serving", allowed=f"null, or mode: {' | '.join(SERVING_MODES)}")
    if mode == "train":
        from moesim.config.training_layout import training_layout

        training_layout(scenario)  # its sizes must fit together
    elif p.tokens_per_gpu is None:
        raise InputError(f"missing required field (mode {mode})",
                         field="parallel.tokens_per_gpu", allowed="a positive integer")
    if mode != "train":
        for name in ("pp", "vp", "tp", "cp"):
            if getattr(p, name) != 1:
                raise InputError(f"parallel.{name} is a training layout field",
                                 field=f"parallel.{name}", allowed="1, or mode: train")
    if p.attention_tp != 1:
        raise InputError(
            f"attention_tp is the serving modes' tensor parallelism, not mode {mode}'s",
            field="parallel.attention_tp",
            allowed=f"1 (training: parallel.tp), or mode: {' | '.join(SERVING_MODES)}")
    if p.moe_tp != 1 and mode != "train":
        raise InputError(
            f"expert tensor parallelism is modelled in training and serving, not mode {mode}",
            field="parallel.moe_tp", allowed="1")
    width = scenario.model.moe_intermediate_size
    if width % p.moe_tp:  # whole MoE instances: training_layout's check
        raise InputError(f"moe_tp {p.moe_tp} does not divide the expert width {width}",
                         field="parallel.moe_tp", allowed=divisors(width))


def _attention_tp_ok(scenario: Scenario, tp: int) -> bool:
    m = scenario.model
    if scenario.parallel.total_gpus % tp or m.num_heads % tp:
        return False
    if m.attention == "gqa" and m.num_kv_heads % tp and tp % m.num_kv_heads:
        return False  # KV heads are split, or replicated whole (vLLM, SGLang)
    return not (m.first_dense_layers and m.dense_intermediate_size % tp)


def check_serving_layout(scenario: Scenario) -> None:
    """Tensor-parallel sizes and micro-batches of a prefill or decode scenario."""
    m, p, sv = scenario.model, scenario.parallel, scenario.serving
    gpus = p.total_gpus
    tp = p.attention_tp
    if not _attention_tp_ok(scenario, tp):
        ok = [d for d in range(1, gpus + 1) if _attention_tp_ok(scenario, d)]
        if gpus % tp:
            why = f"{gpus} GPUs are not a whole number of attention-TP groups of {tp}"
        elif m.num_heads % tp:
            why = f"attention_tp {tp} does not divide the {m.num_heads} attention heads"
        elif m.attention == "gqa" and m.num_kv_heads % tp and tp % m.num_kv_heads:
            why = (f"attention_tp {tp} neither divides nor is a multiple of the "
                   f"{m.num_kv_heads} KV heads")
        else:
            why = (f"attention_tp {tp} does not divide the dense FFN width "
                   f"{m.dense_intermediate_size}")
        raise InputError(why, field="parallel.attention_tp", allowed=", ".join(map(str, ok)))
    instance = p.ep * p.moe_tp
    if gpus % instance or m.moe_intermediate_size % p.moe_tp:
        # With gpus left to its default (ep x moe_tp) any divisor of the width fits.
        most = 64 if p.gpus is None else gpus // p.ep
        ok = [d for d in range(1, most + 1) if m.moe_intermediate_size % d == 0
              and (p.gpus is None or (gpus // p.ep) % d == 0)]
        why = (f"moe_tp {p.moe_tp} does not divide the expert width {m.moe_intermediate_size}"
               if m.moe_intermediate_size % p.moe_tp else
               f"{gpus} GPUs are not a whole number of MoE instances of ep x moe_tp = "
               f"{p.ep} x {p.moe_tp}")
        raise InputError(why, field="parallel.moe_tp", allowed=", ".join(map(str, ok)))
    if sv.batch % p.micro_batches:
        raise InputError(
            f"{sv.batch} requests per attention-DP rank do not split into {p.micro_batches} "
            "equal micro-batches",
            field="parallel.micro_batches", allowed=f"divisors of {sv.batch}")


# What one simulation may hold on the 24 GiB machines moesim is sized for (README: Limits):
# ~22 bytes per routed assignment while a layer is drawn (measured: 0.75 GB peak for
# 33.5 M assignments, DeepSeek-V3 on 2048 GPUs), ~100 bytes per op and GPU of the
# timeline and its tables.
MAX_ASSIGNMENTS = 2**28
MAX_OP_ROWS = 2**26
# Each routed batch keeps its [ep, ep] traffic matrices: ~17 bytes a pair (measured:
# 2.6 GB for 32 batches of EP 2048, 0.85 GB for 8).
MAX_BATCH_PAIRS = 2**28
# The whole training step's schedule: about 35 us per item and stage on these machines.
MAX_PIPELINE_ITEMS = 2**18


def layer_draws(scenario: Scenario) -> int:
    """How many independent synthetic layer draws the scenario makes (``S``)."""
    moe_layers = scenario.model.moe_layers
    wanted = scenario.routing.layer_samples
    return moe_layers if wanted is None else min(wanted, moe_layers)


def check_precision(scenario: Scenario) -> None:
    """FP4 GEMMs need a GPU with an FP4 rate (Blackwell)."""
    hw, t = scenario.hardware, scenario.training
    if hw.fp4_tflops is not None:
        return
    if scenario.mode == "train" and t.precision == "nvfp4":
        raise InputError(f"the {hw.name} has no FP4 GEMM rate (hardware.fp4_tflops)",
                         field="training.precision", allowed="bf16, fp8, fp8-block, mxfp8")
    if scenario.model.gemm_dtype == "fp4" and not (scenario.mode == "train"
                                                   and t.precision is not None):
        raise InputError(f"the {hw.name} has no FP4 GEMM rate (hardware.fp4_tflops)",
                         field="model.gemm_dtype", allowed="bf16, fp8")


def check_size(scenario: Scenario) -> None:
    """Refuse steps too large to simulate in memory, before anything is allocated."""
    m, p, sv = scenario.model, scenario.parallel, scenario.serving
    gpus, micro_batches = p.total_gpus, p.micro_batches
    if whole_batch(scenario):
        from moesim.config.training_layout import training_layout

        layout = training_layout(scenario)
        # The whole step simulates one micro-batch of one pipeline stage.
        tokens, field = layout.tokens_per_microbatch, "training.micro_batch"
        gpus, micro_batches = layout.stage_gpus, 1
        items = 2 * layout.pp * layout.vp * layout.micro_batches
        if items > MAX_PIPELINE_ITEMS:
            raise InputError(
                f"{layout.micro_batches:,} micro-batches per replica through {layout.pp} "
                f"stages make {items:,} schedule items, more than one simulation runs",
                field="training.global_batch",
                allowed=f"2 x pp x vp x micro-batches at most {MAX_PIPELINE_ITEMS:,}")
    elif sv is None:
        tokens, field = p.tokens_per_gpu or 0, "parallel.tokens_per_gpu"
    else:
        per_request = sv.isl if scenario.mode == "prefill" else 1
        tokens, field = -(-sv.batch * per_request // p.attention_tp), "serving.batch"
    assignments = gpus * tokens * m.top_k
    if assignments > MAX_ASSIGNMENTS:
        raise InputError(
            f"{gpus} GPUs x {tokens:,} tokens x top-{m.top_k} = {assignments:,} "
            "token-expert assignments per layer, more than one simulation holds",
            field=field, allowed=f"at most {MAX_ASSIGNMENTS:,} assignments per layer")
    # The routed batches held at once: every synthetic draw's, or a trace layer's groups.
    batches = micro_batches * (gpus // p.ep if scenario.trace else layer_draws(scenario))
    pairs = p.ep * p.ep * batches
    if pairs > MAX_BATCH_PAIRS:
        raise InputError(
            f"{batches} routed batches of EP {p.ep} keep {pairs:,} (source, destination) "
            "counts, more than one simulation holds", field="parallel.ep",
            allowed=f"ep x ep x batches at most {MAX_BATCH_PAIRS:,} (batches: micro-batches "
            "x routing.layer_samples, or x EP groups for a trace)")
    rows = gpus * m.num_layers * micro_batches * 16
    if rows > MAX_OP_ROWS:
        raise InputError(
            f"{m.num_layers} layers x {micro_batches} micro-batches on {gpus} "
            f"GPUs make about {rows:,} op timings, more than one simulation holds",
            field="model.num_layers",
            allowed=f"layers x micro-batches x GPUs x 16 at most {MAX_OP_ROWS:,}")


def check_feasible(scenario: Scenario, topology=None) -> None:
    """Raise InputError when the scenario is impossible; return None otherwise.

    ``topology`` may be passed when already built (its GPU count must match).
    """
    from moesim.topologies import load_topology

    check_model(scenario)
    check_mode(scenario)
    check_size(scenario)
    m, p, r = scenario.model, scenario.parallel, scenario.routing
    E = m.routed_experts
    check_placement(scenario)
    if p.total_gpus % p.ep:
        raise InputError(
            f"{p.total_gpus} GPUs are not a whole number of EP groups of {p.ep}",
            field="parallel.gpus", allowed=f"multiples of {p.ep}",
        )
    if scenario.mode in SERVING_MODES:
        check_serving_layout(scenario)
    elif (not whole_batch(scenario)) and p.tokens_per_gpu % p.micro_batches:
        raise InputError(
            f"{p.tokens_per_gpu} tokens per GPU do not split into {p.micro_batches} "
            "equal micro-batches",
            field="parallel.micro_batches", allowed=f"divisors of {p.tokens_per_gpu}",
        )
    check_precision(scenario)
    if p.comm_sms >= scenario.hardware.sms:
        raise InputError(
            f"{p.comm_sms} communication SMs leave none of {scenario.hardware.sms} for compute",
            field="parallel.comm_sms", allowed=f"0..{scenario.hardware.sms - 1}",
        )
    if topology is None:
        try:
            topology = load_topology(scenario.topology, gpus=p.total_gpus)
        except InputError as err:
            if err.field == "gpus":
                field = "parallel.gpus" if p.gpus is not None else "parallel.ep"
                raise InputError(err.problem, field=field, allowed=err.allowed) from None
            if err.field is None or err.source == scenario.topology:
                raise InputError(str(err), field="topology") from None
            raise
    per_domain = topology.gpus_per_domain
    # EP groups may not straddle NVLink domains unevenly (one partial domain is fine).
    if p.total_gpus > per_domain and p.ep % per_domain and per_domain % p.ep:
        raise InputError(
            f"an EP group of {p.ep} GPUs would split a {per_domain}-GPU NVLink domain unevenly",
            field="parallel.ep",
            allowed=f"divisors or multiples of {per_domain} that divide {E}",
        )
    if r.gate == "device-limited" and r.max_devices is None:
        raise InputError(
            "the device-limited gate needs M", field="routing.max_devices",
            allowed="a positive integer",
        )
    if r.max_devices is not None:
        units, per_unit = limit_units(scenario, per_domain)
        if E % units:
            raise InputError(
                f"the {E} experts do not split into the {units} {r.limit_scope}s that M "
                "limits", field="routing.max_devices",
                allowed="null, or an expert count that the units divide")
        allowed = f"{max(1, -(-m.top_k // per_unit))}..{units}"
        if r.max_devices > units:
            raise InputError(
                f"M = {r.max_devices} is larger than the {units} "
                f"{r.limit_scope}s of an EP group of {p.ep} GPUs",
                field="routing.max_devices", allowed=allowed,
            )
        if r.max_devices * per_unit < m.top_k:
            raise InputError(
                f"M = {r.max_devices} {r.limit_scope}s hold {r.max_devices * per_unit} experts, "
                f"fewer than top_k = {m.top_k}",
                field="routing.max_devices", allowed=allowed,
            )
    if r.balance == "aux-free-bias":
        if r.gate != "group-limited-sigmoid":
            raise InputError("the aux-loss-free bias steers a sigmoid gate's selection",
                             field="routing.balance",
                             allowed="none, or routing.gate: group-limited-sigmoid")
        if scenario.trace is not None and r.replay != "reroute":
            raise InputError("balancing re-routes the trace's stored scores step after step",
                             field="routing.replay", allowed="reroute")
    if scenario.placement.policy == "eplb-hierarchical":
        groups, nodes = placement_groups(scenario, per_domain)
        if E % groups or groups % nodes:
            raise InputError(
                f"{groups} expert groups of {E} experts cannot be packed whole onto the "
                f"{nodes} nodes of an EP group", field="placement.policy",
                allowed="eplb-global, contiguous")


def limit_units(scenario: Scenario, gpus_per_domain: int) -> tuple[int, int]:
    """(units per EP group, logical experts per unit) for the device limit's scope: the
    gate limits contiguous blocks of logical experts, one block per GPU or node (with
    contiguous placement the block is what the GPU or node holds)."""
    p = scenario.parallel
    units = p.ep if scenario.routing.limit_scope == "device" else p.ep // min(
        p.ep, gpus_per_domain)
    return units, scenario.model.routed_experts // units


def placement_groups(scenario: Scenario, gpus_per_domain: int) -> tuple[int, int]:
    """(expert groups, nodes) of an EP group for the hierarchical placement: the device
    limit's units when ``M`` is set (so each unit stays on one node), else the model's
    expert groups when they split over the nodes, else one group per node."""
    p, m = scenario.parallel, scenario.model
    nodes = p.ep // min(p.ep, gpus_per_domain)
    if scenario.routing.max_devices is not None:
        return limit_units(scenario, gpus_per_domain)[0], nodes
    groups = m.expert_groups
    if groups and m.routed_experts % groups == 0 and groups % nodes == 0:
        return groups, nodes
    return nodes, nodes


def check_placement(scenario: Scenario) -> None:
    """The experts' slots split evenly over the GPUs of an EP group."""
    p, pl = scenario.parallel, scenario.placement
    E, R = scenario.model.routed_experts, pl.redundant_experts
    if not pl.rebalanced:
        if R:
            raise InputError(
                "contiguous placement has no redundant experts",
                field="placement.redundant_experts",
                allowed="0, or placement.policy: eplb-hierarchical | eplb-global")
        if E % p.ep:
            raise InputError(
                f"EP size {p.ep} does not divide the {E} routed experts",
                field="parallel.ep", allowed=f"{divisors(E)}; or an eplb placement with "
                f"redundant experts making E + R a multiple of {p.ep}")
        return
    if (E + R) % p.ep:
        first = (-E) % p.ep
        raise InputError(
            f"{E} experts + {R} redundant = {E + R} slots do not split over {p.ep} GPUs",
            field="placement.redundant_experts",
            allowed=", ".join(str(first + k * p.ep) for k in range(3)) + ", ...")
    if pl.loads == "trace" and scenario.trace is None:
        raise InputError("loads from the trace need a trace to replay",
                         field="placement.loads", allowed="window, or a loads CSV file")
    if pl.loads not in ("window", "trace") and scenario.trace is None:
        raise InputError(
            "loads from a file describe a trace's layers; synthetic draws place their hot "
            "experts at random", field="placement.loads", allowed="window")
