"""Bad input for every registered penalty: a table of (argument, bad value, error, message)
rows built from the entry and its signature (``_shared.bad_inputs``): each error names the
function and the argument, says what came in and the fix ("{fn}: {name} must be ..., got
{value!r}. {fix}"). Also: int seeds work wherever a generator does, no side effects, and the
``*_and_norms`` twins."""

from __future__ import annotations

import pytest

from tests.penalties._shared import (
    bad_inputs,
    cases,
    check_bad_input,
    check_int_seed,
    check_no_side_effects,
    check_twin,
)

ROWS = [
    pytest.param(case.values[0], case.values[1], *row.values, id=f"{case.id}:{row.id}")
    for case in cases()
    for row in bad_inputs(*case.values)
]


@pytest.mark.parametrize(("entry", "method", "change", "error", "regex"), ROWS)
def test_bad_input_is_a_clear_error(entry, method, change, error, regex):
    check_bad_input(entry, method, change, error, regex)


@pytest.mark.parametrize(("entry", "method"), cases())
def test_int_seed_is_a_seeded_cpu_generator(entry, method):
    check_int_seed(entry, method)


@pytest.mark.parametrize(("entry", "method"), cases())
def test_no_side_effects_and_works_under_no_grad(entry, method):
    check_no_side_effects(entry, method)


@pytest.mark.parametrize(("entry", "method"), cases())
def test_twin_has_the_signature_and_the_penalty(entry, method):
    check_twin(entry, method)
