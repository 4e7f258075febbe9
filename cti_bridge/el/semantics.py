"""EL semantics: coercions and operators with the Jakarta EL rules, not Python's.

Values are what JSON gives (``None``, ``bool``, ``int``, ``float``, ``str``, ``list``, ``dict``) plus
read-only mappings built by the renderer. The rules follow the Jakarta EL specification (§1.7
arithmetic, §1.8 relational and equality, §1.23 coercions) and JUEL, with these deliberate deviations
from Java, all in the direction of failing one delivery loudly rather than sending a wrong value:

- Integers are Java ``long``: a literal, a string or an arithmetic result outside 64 bits is an
  evaluation error (Java would silently wrap around).
- A division or modulo by zero, and any other arithmetic giving an infinite or NaN double, is an
  evaluation error (Java gives ``Infinity``/``NaN``, which JSON cannot carry).
- There is no ``BigDecimal``/``BigInteger``: decimals are doubles.
- ``<=``/``>=`` of ``null`` and ``null`` is true (EL's "A==B" rule); any other null operand of a
  relational operator gives false.
- Strings compare and count by Unicode code point; Java uses UTF-16 code units (differs only for
  characters outside the Basic Multilingual Plane).
- A list or map in a string context prints as Java's ``toString`` does (``[a, b]``, ``{k=v}``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Final

from cti_bridge.el.errors import TemplateEvalError

LONG_MIN: Final = -(2**63)
LONG_MAX: Final = 2**63 - 1

_LONG_RE: Final = re.compile(r"[+-]?[0-9]+")
# Java's Double.valueOf, without hexadecimal floats, NaN and Infinity (which we refuse anyway).
# Each digit belongs to one place only: ``[0-9]+\.?[0-9]*`` tried every split of a run of digits, so a
# long digit string that failed at its end took quadratic time (16,000 digits: 6 s).
_DOUBLE_RE: Final = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[fFdD]?")
#: Longer text is no number a double can tell apart (and is refused before any matching).
_MAX_NUMBER_TEXT: Final = 400


def describe(value: object) -> str:
    """A short, safe description of a value for error messages (never its full text)."""
    if value is None:
        return "null"
    t = type(value)
    if t is bool:
        return "a boolean"
    if t is int or t is float:
        return f"the number {to_str(value)}"
    if t is str:
        text = str(value)
        text = text if len(text) <= 40 else text[:37] + "..."
        return f"the string {text!r}"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "a map"
    return "an unsupported value"


# -- coercions ----------------------------------------------------------------------------------------


def _long(value: int) -> int:
    if LONG_MIN <= value <= LONG_MAX:
        return value
    raise TemplateEvalError("integer overflow (beyond 64 bits)")


def _finite(value: float) -> float:
    if math.isfinite(value):
        return value
    raise TemplateEvalError("arithmetic result is not a finite number")


def to_long(value: object) -> int:
    """Coerce to Long (EL §1.23.3): null and "" are 0; a boolean is an error."""
    t = type(value)
    if t is int:
        return _long(value)  # type: ignore[arg-type]
    if value is None or value == "":
        return 0
    if t is float:
        return _long(int(_finite(value)))  # type: ignore[arg-type]  # Java's (long) truncates
    if t is str:
        text = str(value)
        if _LONG_RE.fullmatch(text):
            return _long(int(text))
        raise TemplateEvalError(f"cannot coerce {describe(value)} to a number")
    raise TemplateEvalError(f"cannot coerce {describe(value)} to a number")


#: What Java's ``String.trim`` removes: every character up to U+0020 (control characters too), and
#: no other (Python's ``strip()`` took Unicode spaces such as U+00A0 and U+2003, which Java keeps,
#: so "\u00a01.5" was 1.5 here and an error in the reference).
JAVA_TRIM = "".join(map(chr, range(0x21)))


def to_double(value: object) -> float:
    """Coerce to Double (EL §1.23.3)."""
    t = type(value)
    if t is float:
        return _finite(value)  # type: ignore[arg-type]
    if t is int:
        return _finite(float(value))  # type: ignore[arg-type]
    if value is None or value == "":
        return 0.0
    if t is str:
        text = str(value).strip(JAVA_TRIM)  # Double.valueOf trims as String.trim does
        if len(text) <= _MAX_NUMBER_TEXT and _DOUBLE_RE.fullmatch(text):
            if text[-1] in "fFdD":
                text = text[:-1]
            return _finite(float(text))
        raise TemplateEvalError(f"cannot coerce {describe(value)} to a number")
    raise TemplateEvalError(f"cannot coerce {describe(value)} to a number")


def to_bool(value: object) -> bool:
    """Coerce to Boolean (EL §1.23.2): null and "" are false, a string is true only if it is "true"
    ignoring case; a number (or anything else) is an error."""
    if value is True or value is False:
        return value
    if value is None:
        return False
    if type(value) is str:
        return str(value).lower() == "true"
    raise TemplateEvalError(f"cannot coerce {describe(value)} to a boolean")


def java_double(value: float) -> str:
    """``Double.toString``: plain notation in [1e-3, 1e7) with at least one fraction digit, else
    computerized scientific notation (``1.0E7``). Digits are the shortest that round-trip, as in
    JDK 19+ and Python's ``repr``."""
    if value == 0.0:
        return "-0.0" if math.copysign(1.0, value) < 0 else "0.0"
    if not math.isfinite(value):
        raise TemplateEvalError("not a finite number")
    mag = abs(value)
    text = repr(value)
    if 1e-3 <= mag < 1e7:
        if "e" in text or "E" in text:
            # repr uses exponents only below 1e-4 or from 1e16: not in this range, but be safe.
            text = format(value, "f").rstrip("0")
        if "." not in text:
            text += ".0"
        elif text.endswith("."):
            text += "0"
        return text
    # Scientific notation from the shortest round-trip digits.
    _, digit_tuple, exponent = Decimal(repr(mag)).normalize().as_tuple()
    digits = "".join(str(d) for d in digit_tuple)
    if not isinstance(exponent, int):  # only for NaN and infinities, refused above
        raise TemplateEvalError("not a finite number")
    sci = len(digits) - 1 + exponent
    out = digits[0] + "." + (digits[1:] or "0") + "E" + str(sci)
    return "-" + out if value < 0 else out


def _java_elem(value: object) -> str:
    # Collections print their elements with String.valueOf: null is "null" there.
    return "null" if value is None else to_str(value)


def to_str(value: object) -> str:
    """Coerce to String (EL §1.23.1): null is "", booleans true/false, numbers as Java prints them."""
    t = type(value)
    if t is str:
        return value  # type: ignore[return-value]
    if value is None:
        return ""
    if t is bool:
        return "true" if value else "false"
    if t is int:
        try:
            return str(value)
        except ValueError:  # beyond Python's int-to-str digit limit
            raise TemplateEvalError("number too large to print") from None
    if t is float:
        return java_double(value)  # type: ignore[arg-type]
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_java_elem(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_java_elem(k)}={_java_elem(v)}" for k, v in value.items()) + "}"
    raise TemplateEvalError(f"cannot print {describe(value)}")


# -- arithmetic (EL §1.7) ------------------------------------------------------------------------------


def _floaty(value: object) -> bool:
    """A Double operand: a float, or a string with '.', 'e' or 'E' (EL §1.7.1)."""
    t = type(value)
    if t is float:
        return True
    if t is str:
        return "." in value or "e" in value or "E" in value  # type: ignore[operator]
    return False


def add(a: object, b: object) -> object:
    if type(a) is int and type(b) is int:
        return _long(a + b)
    if a is None and b is None:
        return 0
    if _floaty(a) or _floaty(b):
        return _finite(to_double(a) + to_double(b))
    return _long(to_long(a) + to_long(b))


def sub(a: object, b: object) -> object:
    if type(a) is int and type(b) is int:
        return _long(a - b)
    if a is None and b is None:
        return 0
    if _floaty(a) or _floaty(b):
        return _finite(to_double(a) - to_double(b))
    return _long(to_long(a) - to_long(b))


def mul(a: object, b: object) -> object:
    if type(a) is int and type(b) is int:
        return _long(a * b)
    if a is None and b is None:
        return 0
    if _floaty(a) or _floaty(b):
        return _finite(to_double(a) * to_double(b))
    return _long(to_long(a) * to_long(b))


def div(a: object, b: object) -> object:
    """``/`` and ``div``: always a double (``4/2`` is ``2.0``); both null give 0."""
    if a is None and b is None:
        return 0
    x = to_double(a)
    y = to_double(b)
    if y == 0.0:
        raise TemplateEvalError("division by zero")
    return _finite(x / y)


def mod(a: object, b: object) -> object:
    """``%`` and ``mod``: the sign of the dividend, as Java's remainder."""
    if a is None and b is None:
        return 0
    if _floaty(a) or _floaty(b):
        x = to_double(a)
        y = to_double(b)
        if y == 0.0:
            raise TemplateEvalError("modulo by zero")
        return _finite(math.fmod(x, y))
    i = to_long(a)
    j = to_long(b)
    if j == 0:
        raise TemplateEvalError("modulo by zero")
    r = abs(i) % abs(j)
    return -r if i < 0 else r


def neg(a: object) -> object:
    """Unary minus (EL §1.7.5): null is 0; a string is parsed; a boolean is an error."""
    t = type(a)
    if t is int:
        return _long(-a)  # type: ignore[operator]
    if t is float:
        return -a  # type: ignore[operator]
    if a is None:
        return 0
    if t is str:
        return -to_double(a) if _floaty(a) else _long(-to_long(a))
    raise TemplateEvalError(f"cannot negate {describe(a)}")


# -- logic ---------------------------------------------------------------------------------------------


def not_(a: object) -> bool:
    return not to_bool(a)


def empty(a: object) -> bool:
    """``empty``: true for null, "", an empty list or map."""
    if a is None:
        return True
    if isinstance(a, str | list | tuple | Mapping):
        return len(a) == 0
    return False


# -- equality and relations (EL §1.8) ------------------------------------------------------------------


def eq(a: object, b: object) -> bool:
    if a is b:
        return True
    if a is None or b is None:
        return False
    ta = type(a)
    tb = type(b)
    if ta is float or tb is float:
        return to_double(a) == to_double(b)
    if ta is int or tb is int:
        return to_long(a) == to_long(b)
    if ta is bool or tb is bool:
        return to_bool(a) == to_bool(b)
    if ta is str or tb is str:
        return to_str(a) == to_str(b)
    return a == b


def ne(a: object, b: object) -> bool:
    return not eq(a, b)


def _compare(a: object, b: object) -> int:
    ta = type(a)
    tb = type(b)
    x: object
    y: object
    if ta is float or tb is float:
        x, y = to_double(a), to_double(b)
    elif ta is int or tb is int:
        x, y = to_long(a), to_long(b)
    elif ta is str or tb is str:
        x, y = to_str(a), to_str(b)
    elif ta is bool and tb is bool:
        x, y = a, b
    else:
        raise TemplateEvalError(f"cannot compare {describe(a)} with {describe(b)}")
    if x < y:  # type: ignore[operator]
        return -1
    return 1 if x > y else 0  # type: ignore[operator]


def lt(a: object, b: object) -> bool:
    if a is None or b is None:
        return False
    return _compare(a, b) < 0


def gt(a: object, b: object) -> bool:
    if a is None or b is None:
        return False
    return _compare(a, b) > 0


def le(a: object, b: object) -> bool:
    if a is None or b is None:
        return a is b
    return _compare(a, b) <= 0


def ge(a: object, b: object) -> bool:
    if a is None or b is None:
        return a is b
    return _compare(a, b) >= 0


# -- property and index access (EL §1.6) ----------------------------------------------------------------


def get_property(base: object, key: object) -> object:
    """``a.b`` / ``a[b]``: maps by key, lists by integer index; a null base or key, a missing key or an
    index out of range give null. Nothing else has properties: a template can never reach a Python
    attribute."""
    if base is None or key is None:
        return None
    if type(base) is dict:
        try:
            return base.get(key)
        except TypeError:  # unhashable key: Map.get would simply not find it
            return None
    if type(base) is list or type(base) is tuple:
        if type(key) is bool:
            raise TemplateEvalError("a list index must be a number, not a boolean")
        index = to_long(key)
        return base[index] if 0 <= index < len(base) else None
    if isinstance(base, Mapping):
        try:
            return base.get(key)
        except TypeError:
            return None
    raise TemplateEvalError(f"cannot read property {to_str(key)[:40]!r} of {describe(base)}")


OPERATORS: Final = {
    "+": add,
    "-": sub,
    "*": mul,
    "/": div,
    "%": mod,
    "==": eq,
    "!=": ne,
    "<": lt,
    ">": gt,
    "<=": le,
    ">=": ge,
}
