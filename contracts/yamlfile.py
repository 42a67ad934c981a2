"""Reading operator-edited YAML data files into msgspec Structs, with errors that point home.

Every error names the file, the line and the key path (``$.milestones[3].deadline``), and says
what is wrong, so an operator can fix the file without reading code.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import yaml

from contracts.payloads import LONGEST_NOTE

T = TypeVar("T")

_AT_PATH = re.compile(r"^(?P<message>.*?)(?: - at `(?P<path>\$[^`]*)`)?$", re.DOTALL)
_PATH_TOKEN = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]")


class DataFileError(ValueError):
    """A data file that cannot be used: ``file:line: key: what is wrong``."""

    def __init__(self, path: Path, line: int | None, key: str | None, message: str) -> None:
        self.path = path
        self.line = line
        self.key = key
        self.message = message
        where = f"{path}:{line}" if line else str(path)
        what = f"{key}: {message}" if key else message
        super().__init__(f"{where}: {what}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_timestamp(self, node: yaml.ScalarNode) -> Any:
        # An impossible date (2017-04-31) raises a bare ValueError in PyYAML: give it its line.
        try:
            return super().construct_yaml_timestamp(node)
        except ValueError as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} is not a date: {exc}", node.start_mark
            ) from None


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:timestamp", _UniqueKeyLoader.construct_yaml_timestamp)


LONGEST_TEXT = LONGEST_NOTE  # no text in a data file is longer than the longest a message may carry
# Values a data file may hold with its aliases expanded: the largest programme (2,844 counties)
# holds ~40,000. Aliases let a few lines refer to a list of lists a thousand times over, which
# every later step (conversion, validation) would walk in full.
MOST_VALUES = 1_000_000


def load_yaml_struct(path: Path, type_: type[T], error: type[DataFileError]) -> tuple[T, Callable[[str], int | None]]:
    """Decode ``path`` into ``type_``; returns the value and a key-path → line locator."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(path, None, None, "file not found") from None
    except UnicodeDecodeError as exc:
        raise error(path, None, None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise error(path, line, None, f"not valid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise error(path, None, None, f"not valid YAML: {exc}") from None
    except RecursionError:
        raise error(path, None, None, "not valid YAML: nested too deeply") from None

    # The node tree (with its marks) costs ~100× the text, more than the values: it is composed
    # only when a line is asked for (an error), not next to the values at every load.
    nodes: list[yaml.Node | None] = []

    def locate(key_path: str) -> int | None:
        if not nodes:
            nodes.append(yaml.compose(text, Loader=_UniqueKeyLoader))  # it loaded: it composes
        return _line_of(nodes[0], key_path)

    if data is None:
        raise error(path, None, None, "the file is empty")
    unstorable = _unstorable_text(data)
    if unstorable is not None:
        key, what = unstorable
        raise error(path, locate(key), key, what)
    values = _expanded_values(data, MOST_VALUES)
    if values is None:
        raise error(path, None, None, "a value contains itself through an alias (it has no end)")
    if values > MOST_VALUES:
        raise error(path, None, None, f"holds more than {MOST_VALUES:,} values once its aliases are expanded")
    try:
        value = msgspec.convert(data, type_, strict=True)
    except msgspec.ValidationError as exc:
        match = _AT_PATH.match(str(exc))
        assert match is not None
        key = match.group("path")
        raise error(path, locate(key) if key else None, key, match.group("message")) from None
    except RecursionError:
        raise error(path, None, None, "nested too deeply") from None
    return value, locate


def _unstorable_text(data: Any) -> tuple[str, str] | None:
    """(key path, what is wrong) of the first string that cannot be stored or sent: a NUL
    (PostgreSQL refuses it) or a lone surrogate (not text: encoding it fails), both reachable
    through YAML escapes ("\\0", "\\ud800"), or one longer than any text a message carries (a
    rule's source, a level's name: fields with no bound of their own). Each node is looked at
    once (aliases share nodes)."""
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("$", data)]
    while stack:
        key, value = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return key, "contains U+0000 (NUL), which cannot be stored"
            if any("\ud800" <= ch <= "\udfff" for ch in value):
                return key, "contains a lone surrogate (U+D800 to U+DFFF), which is not text"
            if len(value) > LONGEST_TEXT:
                return key, f"is {len(value):,} characters long; text here is at most {LONGEST_TEXT:,}"
        elif isinstance(value, dict | list) and id(value) not in seen:
            seen.add(id(value))
            if isinstance(value, dict):
                for k, v in reversed(value.items()):
                    stack += [(f"{key}.{k}", v), (f"{key}.{k}", k)]  # the key is text too
            else:
                stack += [(f"{key}[{i}]", v) for i, v in reversed(list(enumerate(value)))]
    return None


def _expanded_values(data: Any, most: int) -> int | None:
    """How many values ``data`` holds with its aliases expanded (a list or mapping counted each
    time it is referred to), counted up to ``most`` + 1; None if one contains itself. Each node is
    looked at once: its count is remembered."""
    if not isinstance(data, dict | list):
        return 1
    counted: dict[int, int] = {}
    on_path: set[int] = {id(data)}
    # Depth first, without recursion: (a list or mapping, its members not yet counted, count so far).
    stack: list[tuple[Any, Iterator[Any], int]] = [(data, _members(data), 1)]
    while stack:
        node, members, count = stack.pop()
        for member in members:
            if not isinstance(member, dict | list):
                count += 1
            elif id(member) in counted:
                count += counted[id(member)]
            elif id(member) in on_path:
                return None
            else:  # count it first, then go on with this one's members
                stack += [(node, members, count), (member, _members(member), 1)]
                on_path.add(id(member))
                break
        else:
            on_path.discard(id(node))
            counted[id(node)] = min(count, most + 1)
            if stack:
                parent, rest, so_far = stack.pop()
                stack.append((parent, rest, so_far + counted[id(node)]))
    return counted[id(data)]


def _members(value: dict[Any, Any] | list[Any]) -> Iterator[Any]:
    return itertools.chain(value, value.values()) if isinstance(value, dict) else iter(value)


def _line_of(root: yaml.Node | None, key_path: str) -> int | None:
    """Line (1-based) of the deepest node along ``key_path`` that exists in the document."""
    node = root
    if node is None:
        return None
    line = node.start_mark.line + 1
    for name, index in _PATH_TOKEN.findall(key_path.removeprefix("$")):
        child: yaml.Node | None = None
        if name and isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if str(key_node.value) == name:
                    child = value_node
                    line = key_node.start_mark.line + 1
                    break
        elif index and isinstance(node, yaml.SequenceNode):
            i = int(index)
            if i < len(node.value):
                child = node.value[i]
                line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line
