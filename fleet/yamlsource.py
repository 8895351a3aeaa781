"""YAML loading that remembers the line of every key, so errors can point at it."""

import yaml

from fleet.errors import UsageError


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
        return UsageError(message, path=self.path, line=self.line(keys), key=".".join(map(str, keys)) or None)


def load(path):
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"cannot read: {e.strerror}", path=path) from None
    return loads(text, path)


def loads(text, path):
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise UsageError(f"invalid YAML: {e.problem or e.context}", path=path, line=line) from None
    lines = {}
    data = _convert(node, (), lines, path) if node is not None else None
    return Located(path, data, lines)


def _convert(node, keys, lines, path):
    lines.setdefault(keys, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        result = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise UsageError("a key must be a plain value", path=path, line=key_node.start_mark.line + 1)
            key = _scalar(key_node)
            if key in result:
                raise UsageError(f"duplicate key {key!r}", path=path, line=key_node.start_mark.line + 1,
                                 key=".".join(map(str, keys + (key,))))
            lines[keys + (key,)] = key_node.start_mark.line + 1
            result[key] = _convert(value_node, keys + (key,), lines, path)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, keys + (i,), lines, path) for i, item in enumerate(node.value)]
    return _scalar(node)


def _scalar(node):
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()
