"""Read YAML files of Graft objects and report every problem with its file and line."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from graft.api.kinds import AnyGraftObject, InvalidResource, parse_object


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a file, located as precisely as the YAML allows."""

    file: str
    line: int | None
    resource: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return (
            f"{where}: {self.resource}: {self.message}"
            if self.resource
            else f"{where}: {self.message}"
        )


@dataclass(frozen=True)
class Document:
    """One YAML document with its node tree, kept for line numbers."""

    file: str
    index: int
    data: Any
    node: yaml.Node | None

    @property
    def label(self) -> str:
        if isinstance(self.data, dict):
            kind = self.data.get("kind", "?")
            name = (self.data.get("metadata") or {}).get("name", "?")
            return f"{kind}/{name}"
        return f"document {self.index + 1}"

    def line_of(self, path: Sequence[str | int]) -> int | None:
        """The 1-based line of the deepest node of `path` that exists."""
        node = self.node
        if node is None:
            return None
        line = node.start_mark.line + 1
        for part in path:
            found = _child(node, part)
            if found is None:
                break
            node, line = found
        return line


def _child(node: yaml.Node, part: str | int) -> tuple[yaml.Node, int] | None:
    """The child node for `part` and the line that names it (a key's line for mappings)."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if key.value == part:
                return value, key.start_mark.line + 1
        return None
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        item: yaml.Node = node.value[part]
        return item, item.start_mark.line + 1
    return None


def read_documents(path: Path) -> Iterator[Document]:
    """Every non-empty document in a YAML file; raises yaml.MarkedYAMLError on bad syntax."""
    text = path.read_text()
    loader = yaml.SafeLoader(text)
    try:
        index = 0
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            data = loader.construct_document(node)
            if data is not None:
                yield Document(str(path), index, data, node)
            index += 1
    finally:
        loader.dispose()


def check_file(path: Path) -> tuple[list[AnyGraftObject], list[Problem]]:
    """Parse every document of a file; return the valid objects and every problem found."""
    objects: list[AnyGraftObject] = []
    problems: list[Problem] = []
    try:
        documents = list(read_documents(path))
    except OSError as exc:
        return [], [Problem(str(path), None, "", f"cannot read: {exc.strerror}")]
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        return [], [Problem(str(path), line, "", f"invalid YAML: {exc.problem}")]
    if not documents:
        problems.append(Problem(str(path), None, "", "no YAML documents in the file"))
    for document in documents:
        try:
            objects.append(parse_object(document.data))
        except InvalidResource as exc:
            for issue in exc.issues:
                problems.append(
                    Problem(document.file, document.line_of(issue.path), document.label, str(issue))
                )
    return objects, problems
