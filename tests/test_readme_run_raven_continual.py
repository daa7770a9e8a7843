"""The README's raven and continual commands run as written (a group of test_readme_commands' run, in a file of its
own so that pytest-xdist runs it beside the others)."""
import pytest

from tests.test_readme_commands import run_group


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    run_group(tmp_path, "raven_continual", 9)
