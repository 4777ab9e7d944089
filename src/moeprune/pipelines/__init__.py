"""One registered pipeline per allocation, all run by `run` (the one path from a recipe to a
checkpoint):

    uniform   the criterion removes round(s * E_l) experts in every MoE layer
    evoesap   EvoESAP: the criterion's order, per-layer counts searched by ESAP
    eep       EEP: which experts each layer keeps (and merging, fewer active experts), searched
    plan      the experts a plan file names

A pipeline is ``choose(ctx: RunContext) -> Choice``; `recipe.PIPELINES` names them (lazily, so that
the specs check an allocation's name without importing this package).
"""

from .base import PIPELINES, Choice, RunContext
from .run import RunResult, apply_choice, run, save_checkpoint

__all__ = ["PIPELINES", "Choice", "RunContext", "RunResult", "apply_choice", "run", "save_checkpoint"]
