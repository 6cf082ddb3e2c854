"""Device facts, device profiles and execution-provider planning.

``collect_facts`` reads what the box is (under a root directory, so tests use fake trees),
``load_profiles`` / ``select_profile`` pick the device profile, and ``plan_providers`` (pure)
turns profile + facts + model into the ordered providers or delegates to try.
"""

from __future__ import annotations

from edgeagent.device.facts import (
    DeviceFacts,
    GpuInfo,
    LibraryInfo,
    RuntimeFacts,
    collect_facts,
    detect_runtimes,
)
from edgeagent.device.plan import (
    TRT_CACHE_DIRNAME,
    Exclusion,
    PlannedProvider,
    ProviderPlan,
    RejectedVariant,
    VariantRanking,
    plan_providers,
    preferred_precisions,
    rank_variants,
)
from edgeagent.device.probe import format_probe_text, probe_report
from edgeagent.device.profiles import (
    Candidate,
    DeviceProfile,
    ProfileSelection,
    load_profiles,
    select_profile,
)

__all__ = [
    "TRT_CACHE_DIRNAME",
    "Candidate",
    "DeviceFacts",
    "DeviceProfile",
    "Exclusion",
    "GpuInfo",
    "LibraryInfo",
    "PlannedProvider",
    "ProfileSelection",
    "ProviderPlan",
    "RejectedVariant",
    "RuntimeFacts",
    "VariantRanking",
    "collect_facts",
    "detect_runtimes",
    "format_probe_text",
    "load_profiles",
    "plan_providers",
    "preferred_precisions",
    "probe_report",
    "rank_variants",
    "select_profile",
]
