"""Bad gin input, caught before anything runs and said in one paragraph.

gin checks names only where it can: an unknown configurable or parameter fails the parse, but a
macro is any name, so `--gin.TRAIN_STEPZ=5` binds a macro nothing reads and the run trains with
the default. The rule (gin_config.parse(check_bindings=True), as `moescale train`, `demo` and
`count` parse their --gin flags):

  * a macro bound by a binding (`--gin.NAME=VALUE`, a `NAME = VALUE` line of `--gin_bindings`)
    must be used: referenced as `%NAME` by a configurable's binding, directly or through other
    macros, or read by moescale's Python by name (gin_config.READ_BY_CODE). Macros the gin files
    bind are not checked: shipped files define macros that a given config legitimately leaves
    unused (models/csordas2023/base.gin sets every family's sizes, N_E for SigmaMoE and
    SWITCH_NUM_EXPERTS for Switch, and CSORDAS_* recipe macros only runs/csordas2023.gin reads).
  * a `%NAME` a binding uses must be bound somewhere (gin would only fail later, mid-call).

Each refusal names the bad value and the close valid names (difflib), as do gin's own errors
for unknown configurables and parameters once `explain` has added them.
"""

from __future__ import annotations

import difflib
import inspect
import re
import tokenize
from typing import Callable, Iterable, Mapping, Sequence

import gin
from gin import config_parser

_MACRO = '/gin.macro'


class ConfigError(ValueError):
  """Bad gin input; the message is the whole story (the CLI prints it without a traceback)."""


def matches(name: str, candidates: Iterable[str]) -> list[str]:
  """The (at most 3) candidates close to name, closest first."""
  return difflib.get_close_matches(name, sorted(set(candidates)), n=3, cutoff=0.6)


def did_you_mean(hits: Sequence[str]) -> str:
  return f" Did you mean {' or '.join(hits)}?" if hits else ''


def close(name: str, candidates: Iterable[str]) -> str:
  """' Did you mean A or B?' for the candidates close to name, else ''."""
  return did_you_mean(matches(name, candidates))


def _macro_name(ref) -> str | None:
  s = ref.scoped_selector
  return s[:-len(_MACRO)] if s.endswith(_MACRO) else None


def _macro_refs(value) -> set[str]:
  names = (_macro_name(r) for r in gin.config.iterate_references(value))
  return {n for n in names if n}


_VALUES = ("a value is a Python literal (5, 0.1, 'text', (1, 2), {'k': 1}, None, True), a "
           '@Configurable or a %MACRO')


def _reason(e: Exception) -> str:
  """Why gin could not parse, without Python's parser internals ('malformed node or string on
  line 1: <ast.Name object at 0x7f...>')."""
  if isinstance(e, tokenize.TokenError):
    return 'an unclosed bracket or quote?'
  lines = [l.strip() for l in (e.msg or '').splitlines() if ' object at 0x' not in l]
  return '; '.join(l for l in lines if l) or 'invalid syntax'


def binding_statements(bindings: Sequence[str]) -> list[config_parser.BindingStatement]:
  """Every binding statement of the bindings, each parsed alone so a syntax error names the
  binding it is in. Parsing binds nothing (gin binds in parse_config)."""
  out = []
  for text in bindings:
    try:
      parser = config_parser.ConfigParser(text, gin.config.ParserDelegate(skip_unknown=True))
      out.extend(s for s in parser if isinstance(s, config_parser.BindingStatement))
    except (SyntaxError, tokenize.TokenError) as e:
      raise ConfigError(f'cannot parse the gin binding `{text}` ({_reason(e)}): {_VALUES}, '
                        "and a string needs quotes the shell keeps: --gin.MODEL_DIR=\"'runs/x'\""
                        ) from None
  return out


def _config() -> Mapping:
  # gin has no public view of all parsed bindings; its own finalize hooks walk this dict of
  # (scope, selector) -> {parameter: value}, macros being the scope of selector 'gin.macro'.
  return gin.config._CONFIG  # pylint: disable=protected-access


def bound_macros() -> set[str]:
  return {scope for scope, selector in _config() if selector == 'gin.macro'}


def unbound_macro(name: str) -> str:
  return f'%{name} is used but no gin file or binding sets it.{close(name, bound_macros())}'


def used_macros(read_by_code: Iterable[str] = ()) -> set[str]:
  """Macros a configurable's binding references, directly or through other macros, plus those
  moescale reads by name (and what they reference)."""
  config = _config()
  macro_values = {scope: params for (scope, sel), params in config.items() if sel == 'gin.macro'}
  todo = [*read_by_code]
  for (_, selector), params in config.items():
    if selector != 'gin.macro':
      todo.extend(_macro_refs(params))
  used = set()
  while todo:
    name = todo.pop()
    if name not in used:
      used.add(name)
      todo.extend(_macro_refs(macro_values.get(name, {})))
  return used


def check_macros(statements: Sequence[config_parser.BindingStatement],
                 read_by_code: Iterable[str] = ()) -> None:
  """Refuses a macro the statements bind that nothing uses, and a %NAME they use that nothing
  binds (the rule of the module docstring). Call after parsing, before finalizing."""
  bound, used = bound_macros(), used_macros(read_by_code)
  for s in statements:
    text = s.location.line_content.strip()
    unbound = sorted(_macro_refs(s.value) - bound)
    if unbound:
      raise ConfigError(f'`{text}`: {unbound_macro(unbound[0])}')
    name = f'{s.scope}/{s.selector}' if s.scope else s.selector
    if not s.arg_name and name not in used:
      hint = close(name, used) or (f" The macros this config uses: {', '.join(sorted(used))}."
                                   if used else '')
      raise ConfigError(f'`{text}` binds the macro {name}, which no configurable of these gin '
                        f'files uses (nothing refers to %{name}), so it would change nothing.'
                        f'{hint}')


def parameters(fn: Callable | None) -> list[str]:
  """The parameters a gin binding can set on fn (a class: its constructor's)."""
  if fn is None:
    return []
  try:  # a class's own constructor: nnx.Module's metaclass hides it behind (*args, **kwargs)
    sig = inspect.signature(fn.__init__ if inspect.isclass(fn) else fn)
  except (TypeError, ValueError):
    return []
  kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
  return [p.name for p in sig.parameters.values() if p.kind in kinds and p.name != 'self']


_NO_PARAMETER = re.compile(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'\.")
_NO_CONFIGURABLE = re.compile(r"No configurable matching (?:reference )?'@?([^'(]+)(?:\(\))?'\.")
_NO_MACRO = re.compile(r"No bindings specified for '([^']+)/gin\.macro' in config string:.*",
                       re.S)
_BINDING_LOCATION = re.compile(r'\n  In bindings string line \d+\n    ')


def explain(message: str, known: Mapping[str, Callable]) -> str:
  """gin's error message with the close valid names added after its first line; gin's dump
  of the whole config (after an unbound macro) dropped. known: configurable name -> fn."""
  first, sep, rest = message.partition('\n')
  if m := _NO_PARAMETER.match(first):
    name, param = m.groups()
    params = parameters(known.get(name.rsplit('.', 1)[-1]))
    first += close(param, params) + (f" {name} takes: {', '.join(params)}." if params else '')
  elif m := _NO_CONFIGURABLE.match(first):
    first += close(m.group(1).rsplit('.', 1)[-1], known) or (
        f" Known configurables: {', '.join(sorted(known))}.")
  elif m := _NO_MACRO.match(message):
    return unbound_macro(m.group(1))
  return first + _BINDING_LOCATION.sub('\n  In the binding: ', sep + rest)


def file_syntax_error(e: Exception, path: str) -> ConfigError:
  """A syntax error of a gin file (or a file it includes) as one message with its place."""
  if isinstance(e, SyntaxError):
    return ConfigError(f'cannot parse gin file {e.filename}, line {e.lineno}: '
                       f'`{(e.text or "").strip()}` ({_reason(e)}): {_VALUES}')
  return ConfigError(f'cannot parse gin file {path} or a file it includes ({_reason(e)})')


_CALL_CONTEXT = re.compile(
    r"\n  In call to configurable '([^']*)' \(.*?\)(?: in scope '([^']*)')?")
_TYPE_CONTEXT = re.compile(r'\n  (No values supplied by Gin or caller|Gin had values bound|'
                           r'Caller supplied values) for[^\n]*')


def call_error_message(e: Exception) -> str | None:
  """What to print for an error raised inside a gin-configured call: its message without the
  lines gin adds at every configurable it passed ("In call to configurable 'run_training'
  (<function run_training at 0x7f...>)"), since the constructor's own message names the value.
  A TypeError names no value, so what gin's lines tell is said instead: the arguments nothing
  bound, or the innermost configurable (gin's first line). A TypeError that left no
  gin-configured call is a bug, not bad input: None (the CLI shows its traceback)."""
  text = str(e)
  message = _TYPE_CONTEXT.sub('', _CALL_CONTEXT.sub('', text)).rstrip()
  if not isinstance(e, TypeError):
    return message
  m = _CALL_CONTEXT.search(text)
  if m is None:
    return None
  name, scope = m.groups()
  if name == 'macro':  # a `%NAME` nothing binds (no finalize checked it: `moescale count`)
    return unbound_macro(scope)
  missing = re.search(r'No values supplied by Gin or caller for arguments: \[(.*?)\]', text)
  if missing:
    args = [a.strip(" '") for a in missing.group(1).split(',')]
    return (f"{name} has no value for {', '.join(args)}: bind them, e.g. "
            f'--gin.{name}.{args[0]}=...')
  return f'{message} (in {name}: is one of its bound values of the wrong type?)'
