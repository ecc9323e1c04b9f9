"""What-if analysis over one Engine: profile combinations per (OS, host) cell, and before/after
comparisons of domains across host, profile-library or OS changes (docs/whatif-schema.md)."""

from virtpolicy.whatif.combinations import CellAnalysis, MinimalInfeasible, analyse_cell
from virtpolicy.whatif.compare import CompareReport, DomainChange, Side, compare_domains
from virtpolicy.whatif.report import CombinationsReport, analyse_combinations

__all__ = [
    "CellAnalysis",
    "CombinationsReport",
    "CompareReport",
    "DomainChange",
    "MinimalInfeasible",
    "Side",
    "analyse_cell",
    "analyse_combinations",
    "compare_domains",
]
