"""The template language of mappings: ``${...}`` expressions in Jakarta EL's subset of
el-templates.md, compiled once and evaluated safely.

Layout: ``scanner`` (composite strings and tokens), ``parser`` (tokens to a tree), ``semantics`` (EL
coercions and operators), ``functions`` (``fn:``), ``compiler`` (tree to closures, or to a restricted
Python AST for simpleeval), ``template`` (the compiled objects), ``errors``. Pure code: no I/O.

Where the behaviour deliberately differs from Java/JUEL, the module concerned says so in its docstring
(``semantics``: numbers and comparisons; ``scanner``: literals and identifiers; ``functions``: string
lengths and case mapping; ``compiler``: why two engines and which one runs where).
"""

from cti_bridge.el.errors import RenderError, TemplateError, TemplateEvalError, TemplateSyntaxError
from cti_bridge.el.template import Expression, Template, compile_expression, compile_template

__all__ = [
    "Expression",
    "RenderError",
    "Template",
    "TemplateError",
    "TemplateEvalError",
    "TemplateSyntaxError",
    "compile_expression",
    "compile_template",
]
