"""The test suite's own log check (tests/conftest.py) can fail: a warning in a fixture's
setup or teardown, a warning in the test, an expected message that never came, and a
removed handler each fail the test that caused them. Run in a pytest of its own (a
subprocess, so that its warnings never reach this run's check)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")

INNER = """
import logging

import pytest

log = logging.getLogger("inner")


@pytest.fixture
def warns_in_setup():
    log.warning("said in setup")


@pytest.fixture
def warns_in_teardown():
    yield
    log.warning("said in teardown")


def test_a_warning_in_setup(warns_in_setup):
    pass


def test_a_warning_in_teardown(warns_in_teardown):
    pass


def test_a_warning_in_the_test():
    log.error("said in the test")


@pytest.mark.expected_log("said in the test")
def test_an_expected_warning():
    log.warning("said in the test")


@pytest.mark.expected_log("said in teardown")
def test_an_expected_warning_in_teardown(warns_in_teardown):
    pass


@pytest.mark.expected_log("never said")
def test_an_expected_warning_that_never_came():
    pass


@pytest.mark.expected_log(maybe=["perhaps said", "perhaps not"])
def test_a_warning_that_may_come():
    log.warning("perhaps said")


@pytest.mark.expected_log("never said either")
def test_a_failing_test_is_not_also_blamed_for_its_missing_message():
    assert False


def test_removing_the_handler():
    logging.getLogger().handlers.clear()


def test_the_next_test_is_checked_again():
    log.warning("said after a removal")
"""


def test_the_log_check_fails_what_it_should(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rfE")
    outcomes = {
        line.split(" ")[1].split("::")[1]: line.split(" ")[0]
        for line in result.outlines
        if line.startswith(("FAILED ", "ERROR ")) and "::" in line
    }
    assert outcomes == {
        "test_a_warning_in_setup": "ERROR",
        "test_a_warning_in_teardown": "ERROR",
        "test_a_warning_in_the_test": "FAILED",
        "test_an_expected_warning_that_never_came": "ERROR",
        "test_a_failing_test_is_not_also_blamed_for_its_missing_message": "FAILED",
        "test_removing_the_handler": "FAILED",
        "test_the_next_test_is_checked_again": "FAILED",
    }, result.stdout.str()
    result.stdout.fnmatch_lines(
        [  # errors are reported before failures
            "*WARNING inner: said in setup (in setup)*",
            "*WARNING inner: said in teardown (in teardown)*",
            "*expected, never logged: 'never said'*",
            "*ERROR inner: said in the test (in call)*",
            "*the log check's handler was removed from the root logger (during call)*",
            "*WARNING inner: said after a removal (in call)*",
        ]
    )
    assert "never logged: 'never said either'" not in result.stdout.str()
    result.assert_outcomes(passed=5, failed=4, errors=3)
