"""YAML loading that remembers the line of every key, so errors can point at it.

Input is bounded: inventories and roles are edited by many people, and a 400-byte file of nested
aliases (a "billion laughs") or a deeply nested one must be refused at once, not expanded."""

import copy

import yaml

from fleet.errors import UsageError

# Limits far above any real inventory (1,000 hosts take about 100 KiB and 20,000 values), low
# enough that the worst file within them loads in about a second.
MAX_BYTES = 256 << 10  # a larger file is refused unread
MAX_NODES = 50_000  # values (scalars, mappings, lists) written in the file
MAX_DEPTH = 50  # nesting of mappings and lists
MAX_ALIAS_EXPANSION = 10_000  # values that aliases stand for, in all


class Located:
    """Plain data from a YAML file plus the line where each key path was written."""

    def __init__(self, path, data, lines):
        self.path, self.data, self.lines = path, data, lines

    def line(self, keys):
        """Line of the key path, or of its nearest written ancestor."""
        keys = tuple(keys)
        while keys and keys not in self.lines:
            keys = keys[:-1]
        return self.lines.get(keys, 1)

    def error(self, keys, message):
        return UsageError(message, path=self.path, line=self.line(keys), key=key_path(keys))


def key_path(keys):
    """"services.inference.port", or None for the top level."""
    return ".".join(map(_key_text, keys)) or None


def _key_text(key):
    """A key as written; quoted if it is not printable text, so that an error stays one line."""
    if isinstance(key, str):
        return key if key.isprintable() else repr(key)
    return str(key)


def load(path):
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise UsageError(f"cannot read: {e.strerror}", path=path) from None
    if len(raw) > MAX_BYTES:
        raise UsageError(f"file is larger than {MAX_BYTES // 1024} KiB", path=path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"not UTF-8 text (byte {e.start})", path=path) from None
    return loads(text, path)


def loads(text, path):
    builder = _Builder(path)
    try:
        # Parsed whole first, so that a file that is not YAML at all is reported as such.
        data = builder.build(list(yaml.parse(text, Loader=_PARSER)))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise UsageError(f"invalid YAML: {e.problem or e.context}", path=path, line=line) from None
    except yaml.YAMLError as e:  # a character YAML does not allow (its reader names no line)
        raise UsageError(f"invalid YAML: {str(e).splitlines()[0]}", path=path) from None
    return Located(path, data, builder.lines)


_PARSER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when present: 30x faster


class _Frame:
    """A mapping or list being built."""

    def __init__(self, value, keys, anchor):
        self.value, self.keys, self.anchor = value, keys, anchor
        self.key = _NO_KEY  # in a mapping: the key whose value comes next
        self.size = 1  # values in it, aliases counted expanded


_NO_KEY = object()
_STR = "tag:yaml.org,2002:str"


class _Builder:
    """Parser events -> plain data with the line of each key path, in one pass without recursion
    (so nesting cannot overflow the stack; deeper than MAX_DEPTH is refused). An alias is a copy
    of its anchor's value, whose values count against MAX_ALIAS_EXPANSION; an alias inside its
    own anchor is a recursive alias and is refused."""

    def __init__(self, path):
        self.path = path
        self.lines = {}
        self._anchors = {}  # anchor -> (value, size), once complete
        self._stack = []
        self._expanded = self._nodes = self._documents = 0
        self._scalars = yaml.SafeLoader("")  # resolves and constructs plain values (ints, bools, ...)

    def build(self, events):
        result = None
        for event in events:
            line = event.start_mark.line + 1
            if isinstance(event, (yaml.CollectionStartEvent, yaml.ScalarEvent)):
                self._nodes += 1
                if self._nodes > MAX_NODES:
                    raise UsageError(f"more than {MAX_NODES} values in one file", path=self.path, line=line)
            if isinstance(event, yaml.DocumentStartEvent):
                self._documents += 1
                if self._documents > 1:
                    raise UsageError("more than one YAML document", path=self.path, line=line)
            elif isinstance(event, yaml.CollectionStartEvent):
                keys = self._child_keys(line, collection=True)
                if len(self._stack) >= MAX_DEPTH:
                    raise self._error(keys, line, f"nested more than {MAX_DEPTH} levels deep")
                value = {} if isinstance(event, yaml.MappingStartEvent) else []
                self._stack.append(_Frame(value, keys, event.anchor))
            elif isinstance(event, yaml.CollectionEndEvent):
                frame = self._stack.pop()
                result = self._add(frame.value, frame.size, frame.anchor, line)
            elif isinstance(event, yaml.ScalarEvent):
                result = self._add(self._scalar(event), 1, event.anchor, line)
            elif isinstance(event, yaml.AliasEvent):
                result = self._add(*self._alias(event.anchor, line), None, line)
        return result

    def _child_keys(self, line, collection=False):
        """Key path of the next value in the innermost collection (None: it is a mapping key)."""
        if not self._stack:
            self.lines.setdefault((), line)
            return ()
        frame = self._stack[-1]
        if isinstance(frame.value, list):
            keys = frame.keys + (len(frame.value),)
        elif frame.key is _NO_KEY:
            if collection:
                raise UsageError("a key must be a plain value", path=self.path, line=line)
            return None
        else:
            keys = frame.keys + (frame.key,)
        self.lines.setdefault(keys, line)
        return keys

    def _add(self, value, size, anchor, line):
        if anchor is not None:
            self._anchors[anchor] = (value, size)
        if not self._stack:
            return value
        keys = self._child_keys(line)
        frame = self._stack[-1]
        frame.size += size
        if isinstance(frame.value, list):
            frame.value.append(value)
        elif keys is None:  # a mapping key
            if isinstance(value, (dict, list)):
                raise UsageError("a key must be a plain value", path=self.path, line=line)
            if value in frame.value:
                raise self._error(frame.keys + (value,), line, f"duplicate key {value!r}")
            frame.key = value
            self.lines[frame.keys + (value,)] = line
        else:
            frame.value[frame.key] = value
            frame.key = _NO_KEY
        return None

    def _alias(self, anchor, line):
        if anchor not in self._anchors:
            inside = any(frame.anchor == anchor for frame in self._stack)
            message = "recursive YAML alias (a node inside itself)" if inside else f"undefined alias *{anchor}"
            raise self._error(self._child_keys(line) or (), line, message)
        value, size = self._anchors[anchor]
        self._expanded += size
        if self._expanded > MAX_ALIAS_EXPANSION:
            raise self._error(self._child_keys(line) or (), line,
                              f"YAML aliases expand to more than {MAX_ALIAS_EXPANSION} values")
        return copy.deepcopy(value), size  # a copy, as if written out: later changes stay local

    def _scalar(self, event):
        tag = event.tag
        if tag is None or tag == "!":
            tag = self._scalars.resolve(yaml.ScalarNode, event.value, event.implicit)
        if tag == _STR:
            return event.value
        node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, style=event.style)
        return self._scalars.construct_object(node, deep=True)

    def _error(self, keys, line, message):
        return UsageError(message, path=self.path, line=line, key=key_path(keys))
