"""Render millrace's templates exactly as Ansible's template lookup renders them.

`millrace broker config`, `millrace provision` and `millrace up` render the same files
(millrace/ops/templates/) the broker and edge_agent roles render with
`lookup('ansible.builtin.template', ...)`, so the output must not depend on who renders.
The environment therefore copies the lookup's Jinja2 settings: trim_blocks on,
lstrip_blocks off, no autoescaping, a sandbox, None printed as nothing, and the
template's trailing newlines padded back onto the result (Jinja's keep_trailing_newline
would differ when trim_blocks eats the last newline or a value ends in one).
StrictUndefined makes a misspelt variable an error, as it is under Ansible, instead of
an empty string in a config file; every template problem becomes a ConfigError naming
the template, the line and, for an undefined variable, the variable.

Ansible's own filters (`bool`, `to_json`, ...) do not exist here: a template using one
fails loudly on this side instead of rendering differently.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from millrace.errors import ConfigError

# The package directory of the templates, relative to the millrace.ops package.
PACKAGE = "millrace.ops"
PACKAGE_DIR = "templates"


def _finalize(value: Any) -> Any:
    """Print None as nothing, as Ansible does (Jinja alone prints 'None')."""
    return "" if value is None else value


def _environment(loader: jinja2.BaseLoader) -> jinja2.Environment:
    return SandboxedEnvironment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=False,
        keep_trailing_newline=False,
        autoescape=False,
        finalize=_finalize,
    )


@functools.cache
def _packaged() -> jinja2.Environment:
    return _environment(jinja2.PackageLoader(PACKAGE, PACKAGE_DIR))


def render_packaged(name: str, context: Mapping[str, Any]) -> str:
    """Render the packaged template `name` (relative to millrace/ops/templates/)."""
    return _render(_packaged(), name, context, shown=name)


def render_file(path: Path | str, context: Mapping[str, Any]) -> str:
    """Render a template file of the user's; includes resolve next to it, as in the lookup."""
    file = Path(path)
    env = _environment(jinja2.FileSystemLoader(str(file.parent)))
    return _render(env, file.name, context, shown=str(file))


def _render(env: jinja2.Environment, name: str, context: Mapping[str, Any], *, shown: str) -> str:
    assert env.loader is not None
    top: str | None = None
    try:
        source, top, _ = env.loader.get_source(env, name)
        result = env.get_template(name).render(context)
    except jinja2.TemplateNotFound as exc:
        if top is None:
            raise ConfigError(shown, "no such template file") from None
        filename, line = _template_frame(exc.__traceback__)
        where = _where(filename, top, shown, line)
        raise ConfigError(where, f"included template {exc.name!r} not found") from None
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(_where(exc.filename, top, shown, exc.lineno), exc.message or "") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(shown, f"not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise ConfigError(shown, f"cannot read it: {exc}") from None
    except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as exc:
        # Raised by the template's own expressions and filters: the user's mistake, not ours.
        filename, line = _template_frame(exc.__traceback__)
        problem = str(exc)
        if isinstance(exc, jinja2.UndefinedError):
            problem += f" (variables: {', '.join(sorted(context)) or 'none'})"
        raise ConfigError(_where(filename, top, shown, line), problem) from None
    # Ansible keeps as many trailing newlines as the template has, never fewer.
    missing = _trailing_newlines(source) - _trailing_newlines(result)
    return result + "\n" * max(missing, 0)


def _trailing_newlines(text: str) -> int:
    return len(text) - len(text.rstrip("\n"))


def _template_frame(tb: TracebackType | None) -> tuple[str | None, int | None]:
    """File and line of the innermost template frame (Jinja rewrites them to template lines)."""
    found: tuple[str | None, int | None] = (None, None)
    while tb is not None:
        if "__jinja_exception__" in tb.tb_frame.f_globals:
            found = (tb.tb_frame.f_code.co_filename, tb.tb_lineno)
        tb = tb.tb_next
    return found


def _where(filename: str | None, top: str | None, shown: str, line: int | None) -> str:
    """Where a problem is: `shown` for the template asked for, an included one by its path."""
    name = shown if filename is None or filename == top else filename
    return f"{name}, line {line}" if line else name
