"""What moeprune offers, as tables: the registered criteria and the supported MoE families."""

from __future__ import annotations

from rich.table import Table

from .tables import table


def criteria_table() -> Table:
    """The within-layer criteria: what each ranks experts by, and what it needs."""
    from ..criteria import CRITERIA

    crits = {n: CRITERIA.get(n) for n in CRITERIA.names()}
    needs = {n: "dense token subsample" if c.needs_dense else "" for n, c in crits.items()}
    return table({"ranks experts by": {n: c.summary for n, c in crits.items()}, "needs": needs})


def families_table() -> Table:
    """The supported MoE families: where the MoE block is and how it routes."""
    from ..arch import FAMILIES

    fams = dict(sorted(FAMILIES.items()))
    blocks = {n: f"{f.block_attr}: {f.block_classes[0]}" for n, f in fams.items()}
    return table({"MoE block": blocks, "routing": {n: f.routing for n, f in fams.items()}})
