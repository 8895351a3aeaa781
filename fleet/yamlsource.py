"""YAML loading that remembers the line of every key, so errors can point at it.

Input is bounded: inventories and roles are edited by many people, and a 400-byte file of nested
aliases (a "billion laughs") or a deeply nested one must be refused at once, not expanded."""

import yaml

from fleet.errors import UsageError

MAX_BYTES = 1 << 20  # far above any real inventory; a larger file is refused unread
MAX_DEPTH = 50  # nesting of mappings and lists
MAX_ALIAS_EXPANSION = 10_000  # nodes reached again through aliases, in all


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
    """"services.inference.port"; a key that is not printable text is shown quoted, so that the
    error stays one line."""
    return ".".join(k if isinstance(k, str) and k.isprintable() else repr(k) if isinstance(k, str) else str(k)
                    for k in keys) or None


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
    if len(text) > MAX_BYTES:
        raise UsageError(f"file is larger than {MAX_BYTES // 1024} KiB", path=path)
    loader = _BoundedLoader(text, path)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise UsageError(f"invalid YAML: {e.problem or e.context}", path=path, line=line) from None
    finally:
        loader.dispose()
    if node is None:
        return Located(path, None, {})
    converter = _Converter(path)
    data = converter.convert(node, ())
    return Located(path, data, converter.lines)


class _BoundedLoader(yaml.SafeLoader):
    """Composes the node graph (aliases stay shared nodes, nothing is expanded yet), refusing
    nesting deeper than MAX_DEPTH before PyYAML's recursive composer could overflow the stack."""

    def __init__(self, text, path):
        super().__init__(text)
        self._path, self._depth = path, 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.CollectionStartEvent):
            if self._depth >= MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise UsageError(f"nested more than {MAX_DEPTH} levels deep", path=self._path, line=line)
            self._depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1
        return super().compose_node(parent, index)


class _Converter:
    """Node graph -> plain data with the line of each key path. An alias is a node reached a
    second time: each such visit counts against MAX_ALIAS_EXPANSION, and a node inside itself
    (a recursive alias) is refused."""

    def __init__(self, path):
        self.path = path
        self.lines = {}
        self._seen, self._open = set(), set()
        self._expanded = 0
        self._constructor = yaml.SafeLoader("")

    def convert(self, node, keys):
        line = self.lines.get(keys, node.start_mark.line + 1)
        if id(node) in self._open:
            raise UsageError("recursive YAML alias (a node inside itself)", path=self.path, line=line,
                             key=key_path(keys))
        if id(node) in self._seen:
            self._expanded += 1
            if self._expanded > MAX_ALIAS_EXPANSION:
                raise UsageError(f"YAML aliases expand to more than {MAX_ALIAS_EXPANSION} nodes",
                                 path=self.path, line=line, key=key_path(keys))
        self._seen.add(id(node))
        self.lines.setdefault(keys, line)
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node)
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, keys)
            return [self.convert(item, keys + (i,)) for i, item in enumerate(node.value)]
        finally:
            self._open.discard(id(node))

    def _mapping(self, node, keys):
        result = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise UsageError("a key must be a plain value", path=self.path, line=key_node.start_mark.line + 1)
            key = self._scalar(key_node)
            if key in result:
                raise UsageError(f"duplicate key {key!r}", path=self.path, line=key_node.start_mark.line + 1,
                                 key=key_path(keys + (key,)))
            self.lines[keys + (key,)] = key_node.start_mark.line + 1
            result[key] = self.convert(value_node, keys + (key,))
        return result

    def _scalar(self, node):
        return self._constructor.construct_object(node, deep=True)
