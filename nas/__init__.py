"""nas: architecture search over weight-sharing patterns for tiny always-on Conformer recognizers."""

from nas.budget import Budget, Count, count, parse_budget
from nas.config import ArchConfig
from nas.errors import UserError
from nas.plan import Plan, build_plan

__all__ = ["ArchConfig", "Budget", "Count", "Plan", "UserError", "build_plan", "count", "parse_budget"]
