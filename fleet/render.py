"""Jinja2 rendering of role values and template files, strict about undefined names."""

import jinja2

from fleet.errors import UsageError


_MAX_DEPTH = 5


class Renderer:
    def __init__(self, templates_dir):
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(templates_dir),
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
            autoescape=False,
        )

    def value(self, value, context, where):
        """Renders strings inside a role value (recursively through lists and mappings).

        A variable may refer to others ("{{ host.python }} {{ artifact_path }}"), so a string is
        rendered again while it still holds an expression, a few levels deep at most."""
        if isinstance(value, str):
            rendered = value
            for _ in range(_MAX_DEPTH):
                if "{{" not in rendered and "{%" not in rendered:
                    break
                try:
                    rendered = self.env.from_string(rendered).render(context)
                except jinja2.TemplateError as e:
                    raise UsageError(f"cannot render {value!r}: {e}", path=where) from None
            return rendered
        if isinstance(value, list):
            return [self.value(v, context, where) for v in value]
        if isinstance(value, dict):
            return {k: self.value(v, context, where) for k, v in value.items()}
        return value

    def file(self, name, context):
        """Renders a template file; variables that refer to others are resolved first."""
        resolved = dict(context)
        for key, value in context.items():
            if isinstance(value, str) and "{{" in value:
                try:
                    resolved[key] = self.value(value, context, name)
                except UsageError:
                    pass  # refers to something not known yet (a later task's path); unused here
        try:
            return self.env.get_template(name).render(resolved)
        except jinja2.TemplateNotFound:
            raise UsageError("template not found", path=f"templates/{name}") from None
        except jinja2.TemplateError as e:
            line = getattr(e, "lineno", None)
            raise UsageError(str(e), path=f"templates/{name}", line=line) from None
