"""Every file in tests/data/invalid is refused, with a message naming the offending field."""

from __future__ import annotations

from pathlib import Path

import pytest

from graft.cli import main
from graft.manifests import check_file

INVALID = sorted((Path(__file__).parents[1] / "data" / "invalid").glob("*.yaml"))


def _expectation(path: Path) -> tuple[str, str]:
    header = dict(
        line[2:].split(": ", 1) for line in path.read_text().splitlines() if line.startswith("# ")
    )
    return header["expect"].strip(), header["message"].strip()


def test_there_are_at_least_twenty_invalid_specs() -> None:
    assert len(INVALID) >= 20


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_spec_names_the_field(path: Path) -> None:
    field, message = _expectation(path)
    objects, problems = check_file(path)
    assert objects == []
    rendered = [str(p) for p in problems]
    assert any(f": {field}: " in r and message in r for r in rendered), rendered
    # The line points into the file, at or after the document's first line.
    assert all(p.line is not None and p.line >= 3 for p in problems)


def test_validate_command_exits_one_and_prints_file_and_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = next(p for p in INVALID if p.stem == "ft_typo_field")
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:12: FineTuneJob/bad-ft-typo-field: spec.training.learningRat" in out
    assert "did you mean 'learningRate'?" in out


def test_yaml_syntax_error_reports_the_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: graft.dev/v1alpha1\nkind: FineTuneJob\nspec: [unclosed\n")
    _, problems = check_file(broken)
    assert len(problems) == 1
    assert problems[0].line is not None and problems[0].line >= 3
    assert "invalid YAML" in problems[0].message


def test_missing_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    _, problems = check_file(tmp_path / "nope.yaml")
    assert "cannot read" in problems[0].message
