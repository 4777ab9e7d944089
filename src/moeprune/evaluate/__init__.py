"""Evaluation: per-domain perplexity, greedy generation exact match, multiple-choice log-likelihood.

``evaluate_suite(model, tokenizer)`` runs the bundled testbed suite (`moeprune.report` renders results);
``lm_eval_bridge.lm_eval_tasks`` runs lm-eval tasks on the loaded model (optional dependency).
"""

from .generation import generation_exact_match, greedy_generate
from .multiple_choice import multiple_choice_accuracy, option_logprobs
from .perplexity import perplexity_by_domain
from .suite import default_suite_dir, evaluate_model, evaluate_suite, read_jsonl

__all__ = [
    "default_suite_dir",
    "evaluate_model",
    "evaluate_suite",
    "generation_exact_match",
    "greedy_generate",
    "multiple_choice_accuracy",
    "option_logprobs",
    "perplexity_by_domain",
    "read_jsonl",
]
