"""The one command runner (provfw.runner): what a failure is, by type."""

from __future__ import annotations

import hashlib

import pytest

from provfw import exception
from provfw.runner import LARGE_INPUT, Runner


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


@pytest.mark.parametrize("size", [LARGE_INPUT - 1, LARGE_INPUT + 1, 3_000_000])
def test_an_input_of_any_size_reaches_the_tool_intact_through_a_pipe_or_a_memory_file(size):
    # Past LARGE_INPUT the input goes as an in-memory file (a green pipe costs 0.4 s for 3 MB under eventlet).
    text = ("add provfw-v4 203.0.113.7 é\n" * (size // 28 + 1))[:size]
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert Runner()(["sha256sum"], input=text).split()[0] == digest


def test_a_large_failed_restore_quotes_the_line_the_tool_named():
    text = "".join(f"line {n}\n" for n in range(1, 20_001))
    assert len(text) > LARGE_INPUT
    with pytest.raises(exception.ProcessExecutionError) as info:
        Runner()(["sh", "-c", "cat >/dev/null; echo 'Error in line 12345' >&2; exit 1"], input=text)
    assert ">  12345: line 12345" in str(info.value)


def test_a_namespace_is_entered_with_nsenter_net_only_and_no_namespace_runs_the_command_as_is():
    assert Runner().wrap(["ipset", "save"]) == ["ipset", "save"]
    assert Runner("pfw-hv1").wrap(["ipset", "save"]) == ["nsenter", "--net=/run/netns/pfw-hv1", "--", "ipset", "save"]
