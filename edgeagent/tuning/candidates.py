"""What tuning tries: every loadable variant x provider x thread count x batch size (pure)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgeagent.config import ModelSection
from edgeagent.device.plan import PlanOverrides, ProviderPlan
from edgeagent.runtime.manager import ModelSource

#: (format, precision, overrides) -> the plan for one variant on this box (the profile's, with
#: the model's overrides), for listing the providers a candidate may use.
VariantPlanner = Callable[[str, str, PlanOverrides], ProviderPlan]

#: The provider name of a TFLite candidate without a delegate (the built-in kernels).
BUILTIN = "cpu"


@dataclass(frozen=True)
class VariantFile:
    """One file tuning may load: a bundle variant (or a ``path`` model's one file)."""

    file: str
    format: str
    precision: str
    sha256: str
    source: ModelSource | None = None
    """Where it is on the box and the checks it must pass; None until it is fetched (the key
    and the candidate set need only the above)."""


@dataclass(frozen=True, order=True)
class Candidate:
    """One configuration: a variant on one provider (or delegate) with a thread count, its
    throughput measured at ``batch``."""

    variant: str
    format: str
    precision: str
    provider: str
    threads: int
    """0 = the runtime's default."""
    batch: int = 1

    @property
    def id(self) -> str:
        return f"{self.variant}|{self.provider}|t{self.threads}|b{self.batch}"

    @property
    def overrides(self) -> PlanOverrides:
        """What the plan is asked for to run this candidate (the provider, CPU behind it)."""
        return PlanOverrides((self.provider,), self.threads)

    def describe(self) -> str:
        threads = f"{self.threads} thread(s)" if self.threads else "default threads"
        batch = f", batch {self.batch}" if self.batch > 1 else ""
        return f"{self.variant} ({self.format}/{self.precision}) on {self.provider}, " \
               f"{threads}{batch}"

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "format": self.format, "precision": self.precision,
                "provider": self.provider, "threads": self.threads, "batch": self.batch}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Candidate:
        return cls(str(raw["variant"]), str(raw["format"]), str(raw["precision"]),
                   str(raw["provider"]), int(raw["threads"]), int(raw.get("batch", 1)))


def providers_of(plan: ProviderPlan) -> list[str]:
    """The providers (delegates) a plan allows, each a candidate of its own."""
    names = [p.name for p in plan.providers]
    if plan.format == "tflite":
        names.append(BUILTIN)
    return names


def thread_counts(section: ModelSection, cpu_count: int, default: int) -> list[int]:
    """The thread counts to try: the model's fixed ``threads``, else ``tune.threads``, else 1,
    half the cores and all of them; the profile's own count always among them."""
    if section.threads is not None:
        return [section.threads]
    if section.tune.threads:
        counts = set(section.tune.threads)
    else:
        cores = max(1, cpu_count)
        counts = {1, max(1, cores // 2), cores}
    return sorted(counts | {default})


def batch_sizes(section: ModelSection) -> list[int]:
    """Batch sizes throughput is measured at (1 without batching)."""
    if section.max_batch_size <= 0:
        return [1]
    return sorted(set(section.tune.batch_sizes or (section.max_batch_size,)))


def default_candidate(variant: VariantFile, plan: ProviderPlan,
                      section: ModelSection) -> Candidate:
    """What the profile (with the model's overrides) runs without tuning: its variant, the
    plan's first provider, its threads, the configured batch."""
    provider = plan.providers[0].name if plan.providers else BUILTIN
    return Candidate(variant.file, variant.format, variant.precision, provider, plan.threads,
                     max(batch_sizes(section)))


def candidates(variants: Sequence[VariantFile], planner: VariantPlanner,
               section: ModelSection, cpu_count: int, default: Candidate) -> list[Candidate]:
    """Every candidate, the default first, then variant by variant (in the order given:
    the profile's ranking first), provider, threads, batch."""
    out = [default]
    overrides = PlanOverrides(section.providers, section.threads)
    for v in variants:
        plan = planner(v.format, v.precision, overrides)
        for provider in providers_of(plan):
            for threads in thread_counts(section, cpu_count, default.threads):
                for batch in batch_sizes(section):
                    c = Candidate(v.file, v.format, v.precision, provider, threads, batch)
                    if c not in out:
                        out.append(c)
    return out
