"""The one form every command-line tool gives a mistake: one line on stderr, `error: ...`
(`toolkit.cli.fail`).

    from tests.cli_errors import assert_one_line_error
"""

from __future__ import annotations


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    """`stderr` is exactly one `error: ...` line, holding every one of `fragments`."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
