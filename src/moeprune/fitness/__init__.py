"""Fitness of a pruned candidate against the unpruned teacher: ESAP, KL, NLL, measured acceptance.

The teacher is run once on the search set (`run_teacher`, shared by every evaluator of that set) (dense or top-K sparse cache); candidates are evaluated by
masking, restarting from cached hidden states where their masks agree with an earlier candidate.
"""

from .evaluator import CandidateEvaluator, HiddenCache, ReuseStats, TeacherRun, run_teacher
from .metrics import FITNESS, Fitness
from .replay import LayerReplay
from .searchset import SearchBatch, SearchSet
from .speculative import AcceptanceResult, speculative_acceptance
from .teacher import TeacherCache, TeacherSlice, teacher_slice
from .totals import FitnessResult, Totals

__all__ = [
    "FITNESS",
    "AcceptanceResult",
    "CandidateEvaluator",
    "Fitness",
    "FitnessResult",
    "HiddenCache",
    "LayerReplay",
    "ReuseStats",
    "SearchBatch",
    "SearchSet",
    "TeacherCache",
    "TeacherRun",
    "TeacherSlice",
    "Totals",
    "run_teacher",
    "speculative_acceptance",
    "teacher_slice",
]
