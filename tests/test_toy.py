"""The toy task's pretraining documents (pure: no model)."""

import random

import toy
import utils


def test_marker_never_in_a_solution_document():
    """The base model must never see the backtrack marker after an attempt (only in notes)."""
    rng = random.Random(2)
    for i in range(2000):
        context, completion = toy.pretraining_example(toy.make_problem(random.Random(i)), rng, slip=0.2, mu_frac=0.15)
        assert utils.BACKTRACK_MARKER not in context + completion
    assert utils.BACKTRACK_MARKER in toy.NOTE


def test_meta_prover_examples_score_the_answer_only():
    rng, p = random.Random(0), toy.make_problem(random.Random(7))
    for _ in range(50):
        context, completion = toy.pretraining_example(p, rng, slip=0.0, mu_frac=1.0)
        assert context.endswith(utils.MU_SUFFIX) and completion == p["answer"] + "}"
