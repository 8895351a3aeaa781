"""Jinja2 rendering of role values and template files, strict about undefined names.

Rendering is sandboxed (ImmutableSandboxedEnvironment): inventory values may be templates, and
the inventory is edited by many people. Output is never rendered again, so a value inserted into
a template stays data; `{secret:}` and `{env:}` values (Secret) are never templates at all."""

import math
import shlex

import jinja2
import jinja2.meta
import jinja2.sandbox
import yaml

from fleet.errors import UsageError

_MAX_DEPTH = 5  # a variable may refer to one that refers to another ..., this many levels


class Secret(str):
    """A value from `{secret:}` or `{env:}` in the inventory: data, never rendered as a template;
    any file holding it is private (0600) and output shows it as ********."""


class QuotingDumper(yaml.SafeDumper):
    """Dumps every string that is not plain printable text double-quoted, on one line: a secret
    in the output then appears either as itself or as `yaml_scalar(secret)`, which masking knows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **dict(kwargs, width=1 << 30, allow_unicode=True))


def _represent_str(dumper, value):
    # Printable ASCII without "'" appears verbatim in any style PyYAML picks; anything else is
    # double-quoted, where its escapes are exactly yaml_scalar's.
    verbatim = all(0x20 <= ord(ch) <= 0x7E for ch in value) and "'" not in value
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(value), style=None if verbatim else '"')


QuotingDumper.add_representer(str, _represent_str)
QuotingDumper.add_representer(Secret, _represent_str)


def yaml_scalar(value):
    """The `q` filter: value as one YAML scalar that cannot add keys or lines, whatever it holds:
    strings double-quoted with PyYAML's escapes, numbers and booleans as themselves."""
    if isinstance(value, jinja2.Undefined):
        str(value)  # raises: StrictUndefined says which variable
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
        text = repr(value)
        return text if "." in text else text.replace("e", ".0e", 1)  # YAML 1.1 floats need a dot
    if isinstance(value, str):
        return yaml.dump(str(value), Dumper=QuotingDumper, default_style='"').rstrip("\n")
    raise jinja2.TemplateRuntimeError(f"q quotes a string, number or boolean, not {type(value).__name__}")


def secret_forms(secret):
    """The texts a secret can appear as in a rendered file: itself, and its quoted escapes."""
    return {secret, yaml_scalar(secret)[1:-1]}


def _templated(value):
    return isinstance(value, str) and not isinstance(value, Secret) and ("{{" in value or "{%" in value)


class Renderer:
    def __init__(self, templates_dir):
        self.env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            loader=jinja2.FileSystemLoader(templates_dir),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            autoescape=False,
        )
        self.env.filters["q"] = yaml_scalar
        self.env.filters["sh"] = lambda value: shlex.quote(str(value))
        self._compiled = {}  # template text -> (template, names it uses)

    def value(self, value, context, where):
        """Renders strings inside a role value (recursively through lists and mappings).

        A string is rendered once; the variables it names are resolved first when they are
        templates themselves ("{{ host.python }} {{ artifact_path }}"), never the output."""
        if _templated(value):
            return self._render(value, self._resolve(context, self._compile(value, where)[1], where), where)
        if isinstance(value, list):
            return [self.value(v, context, where) for v in value]
        if isinstance(value, dict):
            return {k: self.value(v, context, where) for k, v in value.items()}
        return value

    def file(self, name, context):
        """Renders a template file with every variable it can use resolved first; one that
        cannot be resolved (a later task's path, an error) is undefined, so using it is an error."""
        resolved = dict(context)
        for key in [k for k, v in context.items() if _templated(v)]:
            try:
                resolved[key] = self._resolve(context, {key}, name)[key]
            except UsageError as e:
                resolved[key] = jinja2.StrictUndefined(hint=f"{key}: {e.message}", name=key)
        try:
            return self.env.get_template(name).render(resolved)
        except jinja2.TemplateNotFound:
            raise UsageError("template not found", path=f"templates/{name}") from None
        except jinja2.TemplateError as e:
            line = getattr(e, "lineno", None)
            raise UsageError(str(e), path=f"templates/{name}", line=line) from None

    def _resolve(self, context, names, where, chain=()):
        """context with the named variables, and those they use in turn, rendered."""
        if len(chain) > _MAX_DEPTH:
            raise UsageError(f"variables refer to each other too deeply: {' -> '.join(chain)}", path=where)
        resolved = dict(context)
        for name in names:
            if name in chain:
                raise UsageError(f"variables refer to each other: {' -> '.join(chain + (name,))}", path=where)
            if name in context and _templated(context[name]):
                uses = self._compile(context[name], where)[1]
                inner = self._resolve(context, uses, where, chain + (name,))
                resolved[name] = self._render(context[name], inner, where)
        return resolved

    def _compile(self, text, where):
        if text not in self._compiled:
            try:
                names = jinja2.meta.find_undeclared_variables(self.env.parse(text))
                self._compiled[text] = (self.env.from_string(text), names)
            except jinja2.TemplateError as e:
                raise UsageError(f"cannot render {text!r}: {e}", path=where) from None
        return self._compiled[text]

    def _render(self, text, context, where):
        try:
            return self._compile(text, where)[0].render(context)
        except jinja2.TemplateError as e:
            raise UsageError(f"cannot render {text!r}: {e}", path=where) from None


def dump_yaml(data):
    """A config Envoy or a service reads: every string quoted where YAML could take it for
    something else (Envoy's parser reads an unquoted `n` as false)."""
    return ("# Rendered by fleet; changes here are overwritten on deploy.\n"
            + yaml.dump(data, Dumper=QuotingDumper, sort_keys=False, default_flow_style=False)).encode()
