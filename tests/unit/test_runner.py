"""The one command runner (provfw.runner): what a failure is, by type."""

from __future__ import annotations

import pytest

from provfw import exception
from provfw.runner import Runner


def test_a_program_that_is_not_installed_is_tool_missing_also_inside_a_namespace():
    for runner in (Runner(), Runner("provfw-no-such-namespace")):
        with pytest.raises(exception.ToolMissing) as info:
            runner(["provfw-no-such-tool", "save"], check=False)
        assert info.value.exit_code == 127


def test_exit_127_is_tool_missing_and_another_failure_is_a_process_error():
    with pytest.raises(exception.ToolMissing):
        Runner()(["sh", "-c", "exit 127"])
    with pytest.raises(exception.ProcessExecutionError) as info:
        Runner()(["sh", "-c", "echo refused >&2; exit 2"])
    assert not isinstance(info.value, exception.ToolMissing)
    assert info.value.exit_code == 2 and "refused" in info.value.stderr


def test_a_failed_restore_quotes_the_line_the_tool_named():
    with pytest.raises(exception.ProcessExecutionError) as info:
        Runner()(["sh", "-c", "cat >/dev/null; echo 'Error occurred at line: 2' >&2; exit 1"],
                 input="first\nsecond\nthird\n")
    assert ">      2: second" in str(info.value)
