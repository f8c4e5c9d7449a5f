"""YAML documents as strict models: the one loader, the shared constrained types, one-line errors.

Every YAML file the project reads (the spec, the signed index, the endorser's draft and
`catalogue.yaml`, the site's `approvals.yaml`) is read by `load_yaml` and validated by
`validate_document` into pydantic dataclasses declared with `config=STRICT` and the strict types
below, so a problem is one line naming the file, the field path (`entries[3].sha256`,
`roles.sage.vcpus`) and what was expected. The loader refuses YAML anchors and aliases (a few
hundred bytes of nested aliases stand for gigabytes) and nesting deeper than `MAX_YAML_DEPTH`.

A document is first built straight from the parser's events (`UniqueKeyLoader.plain_data`: plain
mappings, sequences and scalars, which is every file the project writes); anything else, and every
refusal, is left to PyYAML's composer and constructor with the checks below, which then decide.

Patterns match the whole text (`full_match` types, `re.fullmatch` in plain checks): `re.match` with
`^…$` also accepts a trailing newline (`"sage-1\\n"` would pass as a service id and end up in file
names and registry rows).
"""
from __future__ import annotations

import dataclasses
import re
import reprlib
import typing
from collections.abc import Hashable
from datetime import datetime, timezone
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, ConfigDict, Field, PlainValidator, StrictInt, StrictStr, TypeAdapter
from pydantic import ValidationError, ValidationInfo

from cluster.errors import SalvusError

T = TypeVar("T")

STRICT = ConfigDict(extra="forbid")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# The scalar tags whose SafeConstructor takes a scalar node and returns a plain value.
_SCALAR_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("null", "bool", "int", "float", "binary",
                                                              "timestamp", "str"))
_NO_KEY = object()  # an open mapping waiting for its next key, not a value
# Deeper than any document the project reads (a spec is ~5 levels; a role's `config` a few more),
# shallow enough that neither the composer's nor the constructor's recursion can overflow.
MAX_YAML_DEPTH = 32
# libyaml's scanner and parser when present: 6x faster on a 1,000-entry index, which every
# pre-boot check parses; else PyYAML's pure-Python reader, scanner and parser.
_CPARSER: Any = getattr(getattr(yaml, "_yaml", None), "CParser", None)
_PARSER_BASES: tuple[type, ...] = (_CPARSER,) if _CPARSER else (yaml.reader.Reader, yaml.scanner.Scanner,
                                                                yaml.parser.Parser)


class StrictComposer(yaml.composer.Composer):
    """PyYAML's composer, refusing anchors and aliases and bounding nesting depth as it goes.
    Aliases let a few hundred bytes stand for gigabytes once anything walks the data (the
    "billion laughs"); no file the project reads needs them. Slower than `plain_data` (a node per
    value, then a constructor pass): it reads only what that leaves, and gives every refusal."""

    def __init__(self) -> None:
        yaml.composer.Composer.__init__(self)
        self.depth = 0  # open mappings and sequences around the node being composed

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            what = f"alias *{event.anchor}" if isinstance(event, yaml.AliasEvent) else f"anchor &{event.anchor}"
            raise yaml.composer.ComposerError(
                None, None, f"{what} refused (YAML anchors and aliases are not accepted)", event.start_mark)
        if not isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            return super().compose_node(parent, index)
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _Unusual(Exception):
    """What `plain_data` leaves to the composer and constructor: a refusal or a rarer feature."""


class UniqueKeyLoader(StrictComposer, *_PARSER_BASES, yaml.constructor.SafeConstructor,  # type: ignore[misc]
                      yaml.resolver.Resolver):
    """The safe loader (plain types only, like `yaml.safe_load`) that refuses anchors, aliases and
    deep nesting (StrictComposer) and a key given twice in one mapping: PyYAML keeps the last one
    silently, so a second `scheduler:` section or a second `sha256:` in a signed entry would quietly
    replace the first."""

    def __init__(self, stream: str) -> None:
        if _CPARSER:
            _CPARSER.__init__(self, stream)
        else:
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
        StrictComposer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)

    def plain_data(self) -> Any:
        """The document built straight from the parser's events, as `get_single_data` would build it,
        when it is plain mappings, sequences and scalars without anchors, merge keys, collection tags
        or a key given twice, at most MAX_YAML_DEPTH deep; else `_Unusual` (nothing is refused
        here: `get_single_data` reads the text again and refuses with the line). No node objects
        and no constructor pass: a third of the time on a 1,000-entry index. Iterative, so depth
        costs no stack."""
        if self.yaml_path_resolvers:
            raise _Unusual  # tags that depend on the path: the composer's business
        get = self.get_event
        get()  # StreamStartEvent
        if type(get()) is yaml.StreamEndEvent:
            return None  # an empty stream
        plain: dict[str, Any] = {}  # a plain scalar's value by its text: keys repeat in every entry
        stack: list[Any] = []  # the open mappings and sequences, outermost first
        keys: list[Any] = []  # for each, the key whose value comes next (or _NO_KEY)
        root: Any = None
        while True:
            event = get()
            kind = type(event)
            if kind is yaml.ScalarEvent:
                if event.anchor is not None:
                    raise _Unusual
                value = event.value
                tag = event.tag
                if tag is None or tag == "!":
                    if event.implicit[0]:  # plain: its text decides its type, as the resolver says
                        if value in plain:
                            value = plain[value]
                        else:
                            value = plain[value] = self._scalar(
                                self.resolve(yaml.ScalarNode, value, event.implicit), event)
                elif tag in _SCALAR_TAGS:
                    value = self._scalar(tag, event)
                else:
                    raise _Unusual
                opened = False
            elif kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
                if event.anchor is not None or event.tag not in (None, "!") or len(stack) >= MAX_YAML_DEPTH:
                    raise _Unusual
                value = {} if kind is yaml.MappingStartEvent else []
                opened = True
            elif kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
                stack.pop()
                keys.pop()
                continue
            elif kind is yaml.DocumentEndEvent:
                break
            else:
                raise _Unusual  # an alias
            if not stack:
                root = value
            elif type(top := stack[-1]) is list:
                top.append(value)
            elif keys[-1] is _NO_KEY:
                if opened or value in top:  # a collection as a key, or a key given twice
                    raise _Unusual
                keys[-1] = value
            else:
                top[keys[-1]] = value
                keys[-1] = _NO_KEY
            if opened:
                stack.append(value)
                keys.append(_NO_KEY)
        if type(get()) is not yaml.StreamEndEvent:
            raise _Unusual  # a second document
        return root

    def _scalar(self, tag: str, event: yaml.ScalarEvent) -> Any:
        if tag == yaml.resolver.BaseResolver.DEFAULT_SCALAR_TAG:
            return event.value
        if tag not in _SCALAR_TAGS:
            raise _Unusual  # `<<`, `=`
        node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
        try:
            return self.yaml_constructors[tag](self, node)
        except (ValueError, OverflowError):
            raise _Unusual from None

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as e:  # PyYAML lets int('9' * 5000), date(2026, 13, 1) through
            what = node.tag.rpartition(":")[2]
            raise yaml.constructor.ConstructorError(
                None, None, f"{shown(node.value)} is not a valid {what} ({e})", node.start_mark) from None

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if not isinstance(node, yaml.MappingNode):
            return super().construct_mapping(node, deep=deep)  # PyYAML's own error
        # `<<` merges come first after flattening and a mapping's own keys may override them;
        # only a key repeated among the mapping's own keys is refused.
        own = len(node.value) - sum(1 for k, _ in node.value if k.tag == _MERGE_TAG)
        self.flatten_mapping(node)
        first_own = len(node.value) - own
        mapping: dict = {}
        seen: set = set()
        for i, (key_node, value_node) in enumerate(node.value):
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, "found unhashable key", key_node.start_mark)
            if i >= first_own:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
                seen.add(key)
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


def load_yaml(raw: bytes | str, source: str, error: type[SalvusError], max_bytes: int | None = None) -> Any:
    """The plain data in `raw` (size-checked before YAML is touched, UTF-8, no duplicate keys, no
    anchors or aliases, bounded depth), or `error` naming the file and the line."""
    if max_bytes is not None and len(raw) > max_bytes:
        raise error(f"{source}: {len(raw)} bytes exceeds the limit of {max_bytes} bytes; refused unread")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{source}: not UTF-8 text (byte {e.start})") from None
    loader = UniqueKeyLoader(raw)
    try:
        return loader.plain_data()
    except (_Unusual, yaml.YAMLError):
        pass  # read again below: the composer and constructor build it or say what is wrong and where
    finally:
        loader.dispose()
    try:
        return yaml.load(raw, Loader=UniqueKeyLoader)  # noqa: S506 - a safe loader, never the full one
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise error(f"{source}: malformed YAML{where}: {problem}") from None


def validate_document(model: type[T], data: Any, source: str, error: type[SalvusError],
                      internal: tuple[str, ...] = ()) -> T:
    """`data` (from `load_yaml`) as a `model`, or `error` naming the file and the first bad field.
    `internal` fields are set by the program, not the file, and are not offered as keys."""
    if data is None:
        data = {}  # an empty file is an empty mapping
    if not isinstance(data, dict):
        raise error(f"{source}: expected a mapping, got {type(data).__name__}")
    try:
        # A TypeAdapter over a pydantic dataclass reuses the class's schema: building one is ~10 µs.
        return TypeAdapter(model).validate_python(data, context={"from_yaml": True})
    except ValidationError as e:
        raise error(f"{source}: {describe_validation_error(e, model, internal)}") from None


# ----------------------------------------------------------------------------- constrained types

def full_match(pattern: str, expected: str, max_length: int | None = None) -> Any:
    """A strict string type that must match `pattern` as a whole; `expected` says what in errors.
    pydantic-core checks it with its Rust regex, where `$` is the end of the text (never before a
    final newline) and no Python call is made: a 1,000-entry index has ~10,000 such fields."""
    return Annotated[StrictStr, Field(pattern=f"^(?:{pattern})$", max_length=max_length, description=expected)]


NAME_PATTERN = r"[a-z][a-z0-9_-]{0,30}"
# Image names and versions become file names in the store: no separators, no dot-dot, no leading
# dot (every '.' is followed by another character or ends the part), at most 64 characters.
IMAGE_PART_PATTERN = r"[A-Za-z0-9](?:\.?[A-Za-z0-9_+-])*\.?"
IMAGE_PART_MAX = 64
SERVICE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
IMAGE_PART_WHAT = "letters, digits, '.', '_', '+', '-' (no '/', no '..', not starting with '.')"

# Role and persistent-disk names: they appear in job names, service ids and file names.
Name = full_match(NAME_PATTERN, "a short lowercase name ([a-z][a-z0-9_-]*)")
ImagePart = full_match(IMAGE_PART_PATTERN, IMAGE_PART_WHAT, IMAGE_PART_MAX)  # an image NAME or VERSION
# Text that stays one line wherever it lands (a job script, a directive, a submit description, an
# authorized_keys file): no CR/LF, no other control characters.
SINGLE_LINE_PATTERN = r"[^\x00-\x1f\x7f]*"
SingleLine = full_match(SINGLE_LINE_PATTERN, "a single line of text (no newline or other control character)")
# A scheduler option's value (partition, queue, account, host name): one word that needs no quoting
# in a job script, a directive line, a DRMAA native specification or a submit description.
SCHEDULER_WORD_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.,@+-]{0,127}"
SchedulerWord = full_match(SCHEDULER_WORD_PATTERN, "a scheduler name of letters, digits, '_', '.', ',', '@', '+', '-'")
PositiveInt = Annotated[StrictInt, Field(ge=1)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]


def is_name(text: str) -> bool:
    return re.fullmatch(NAME_PATTERN, text) is not None


def _is_image_part(text: str) -> bool:
    return len(text) <= IMAGE_PART_MAX and re.fullmatch(IMAGE_PART_PATTERN, text) is not None


def split_image_ref(ref: str) -> tuple[str, str]:
    """`NAME@VERSION` -> (name, version), refusing anything that could escape the image store."""
    name, sep, version = ref.partition("@")
    if not sep or not _is_image_part(name) or not _is_image_part(version):
        raise ValueError(
            "expected NAME@VERSION of letters, digits, '.', '_', '+', '-' (no '/', no '..'), "
            f"got {ref!r}")
    return name, version


def is_image_ref(text: str) -> bool:
    """`text` is a whole NAME@VERSION (for values read back from records and schedulers)."""
    try:
        split_image_ref(text)
    except ValueError:
        return False
    return True


def _image_ref(v: str) -> str:
    split_image_ref(v)
    return v


ImageRef = Annotated[StrictStr, AfterValidator(_image_ref)]  # NAME@VERSION


def is_single_line(text: str) -> bool:
    return re.fullmatch(SINGLE_LINE_PATTERN, text) is not None


def is_service_id(text: str) -> bool:
    """Service ids name persistent-disk directories and registry rows."""
    return re.fullmatch(SERVICE_ID_PATTERN, text) is not None and ".." not in text


def format_time(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime(TIME_FORMAT)


_TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def _utc_time(v: Any, info: ValidationInfo) -> datetime:
    # YAML turns an unquoted time into a datetime of its own reading; documents quote theirs, so
    # from a file only the exact quoted form is taken (programs pass aware datetimes).
    if isinstance(v, datetime):
        if info.context and info.context.get("from_yaml"):
            raise ValueError(f"expected a quoted UTC time like '2026-01-31T12:00:00Z', got {v} unquoted")
        if v.tzinfo is not None:
            return v
    elif isinstance(v, str) and _TIME_RE.fullmatch(v):
        try:  # fromisoformat (3.11 reads the Z as UTC): strptime costs a 1,000-entry index ~20 ms
            return datetime.fromisoformat(v)
        except ValueError:
            pass  # 2026-13-01 and the like
    raise ValueError(f"expected a quoted UTC time like '2026-01-31T12:00:00Z', got {shown(v)}")


UtcTime = Annotated[datetime, PlainValidator(_utc_time)]


# ----------------------------------------------------------------------------- one-line errors

def shown(v: Any) -> str:
    """A short repr for error messages, bounded however large or deeply nested (aliases) `v` is."""
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlevel, r.maxlist, r.maxdict = 57, 57, 2, 4, 4
    text = r.repr(v)
    return text if len(text) < 60 else text[:57] + "..."


def _unwrap(tp: Any) -> Any:
    """Optional[X] and Annotated[X, ...] -> X."""
    while typing.get_origin(tp) in (Annotated, typing.Union) or str(typing.get_origin(tp)) == "types.UnionType":
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _annotation_at(root: Any, loc: tuple[Any, ...]) -> Any:
    """The declared type at `loc` (('entries', 3, 'roles', 0)), or None when it cannot be told."""
    tp: Any = root
    for part in loc:
        tp = _unwrap(tp)
        origin = typing.get_origin(tp)
        if origin in (dict, list):
            tp = typing.get_args(tp)[-1]
            continue
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp, include_extras=True)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _fields_at(root: Any, loc: tuple[Any, ...], internal: tuple[str, ...]) -> list[str] | None:
    """The keys the dataclass at `loc` accepts, to tell a user what an unknown key should be."""
    tp = _unwrap(_annotation_at(root, loc))
    if dataclasses.is_dataclass(tp):
        return [f.name for f in dataclasses.fields(tp) if f.name not in internal]
    return None


def _expected_at(root: Any, loc: tuple[Any, ...]) -> str | None:
    """What a `full_match` type at `loc` expects (its description)."""
    tp = _annotation_at(root, loc)
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            found = [m.description for m in tp.__metadata__ if getattr(m, "description", None)]
            if found:
                return found[0]
            tp = typing.get_args(tp)[0]
        elif origin is typing.Union or str(origin) == "types.UnionType":
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        else:
            return None


def field_path(loc: tuple[Any, ...]) -> str:
    """('entries', 3, 'sha256') -> 'entries[3].sha256'."""
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


_UNKNOWN_KINDS = ("unexpected_keyword_argument", "extra_forbidden")
_MAPPING_KINDS = ("dataclass_type", "dataclass_args_type", "dict_type", "model_type")


def describe_validation_error(e: ValidationError, root: Any, internal: tuple[str, ...] = ()) -> str:
    """The first error of `e` as 'field.path: what was expected' (validating `root`)."""
    errors = e.errors(include_url=False)
    # An unknown key first: a misspelt key (`bytes:` for `size:`) explains the missing one.
    first = next((err for err in errors if err["type"] in _UNKNOWN_KINDS), errors[0])
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    dotted = field_path(loc)
    kind = first["type"]
    if kind in _UNKNOWN_KINDS:
        known = _fields_at(root, loc[:-1], internal)
        msg = "unknown key" + (f" (expected one of: {', '.join(known)})" if known else "")
    elif kind in ("missing", "missing_argument"):
        msg = "required field is missing"
    elif kind == "string_pattern_mismatch" and _expected_at(root, loc):
        msg = f"expected {_expected_at(root, loc)}, got {shown(first.get('input'))}"
    elif kind in _MAPPING_KINDS:
        msg = f"expected a mapping, got {type(first.get('input')).__name__}"
    else:
        msg = first["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        msg = msg[0].lower() + msg[1:]
        if "input" in first and kind not in ("value_error", "assertion_error"):
            msg += f", got {shown(first['input'])}"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{dotted}: {msg}{more}" if dotted else f"{msg}{more}"
