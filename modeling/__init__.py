"""visprune.modeling: gates, gated visual attention, families, pruning plans and the FLOPs model.
nn.Module code only: no file I/O beyond plan JSON, no torch.distributed, no YAML."""

from .flops import (
                    BUILTIN_MODELS,
                    GateProbs,
                    ModelDims,
                    TokenLayout,
                    default_layout,
                    flops_report,
                    prefill_flops,
                    resolve_model_dims,
                    visual_flops,
                    visual_kv_bytes,
)
from .gated_attention import FLEX_NAME, SDPA_NAME, GateValues, VisualContext
from .gates import GateConfig, GateSet, apply_plan, attach_gates, detach_gates, get_gate_set
from .hard_concrete import FixedGate, HardConcreteGate
from .hardened import HARDENED_KWARG, PrunedKVLayer, cache_nbytes, hardened_forward_context, load_pruned
from .layout import VisualLayout, build_layout
from .plan import PLAN_FILE, PLAN_FORMAT, LayerPlan, Plan, PlanError

__all__ = [
                    "BUILTIN_MODELS",
                    "FLEX_NAME",
                    "HARDENED_KWARG",
                    "PLAN_FILE",
                    "PLAN_FORMAT",
                    "SDPA_NAME",
                    "FixedGate",
                    "GateConfig",
                    "GateProbs",
                    "GateSet",
                    "GateValues",
                    "HardConcreteGate",
                    "LayerPlan",
                    "ModelDims",
                    "Plan",
                    "PlanError",
                    "PrunedKVLayer",
                    "TokenLayout",
                    "VisualContext",
                    "VisualLayout",
                    "apply_plan",
                    "attach_gates",
                    "build_layout",
                    "cache_nbytes",
                    "default_layout",
                    "detach_gates",
                    "flops_report",
                    "get_gate_set",
                    "hardened_forward_context",
                    "load_pruned",
                    "prefill_flops",
                    "resolve_model_dims",
                    "visual_flops",
                    "visual_kv_bytes",
]
