"""The root of every error fm reports to a user.

An :class:`FmError` means a bad input or a state the user must change (a config key, a file, a checkpoint); its
message names the file, line or key and says how to fix it. Every command catches ``FmError`` once, prints
``error: <message>`` without a traceback and exits with :attr:`FmError.exit_code`. Anything else is a bug and
keeps its traceback. Each module defines its own subclasses next to the code that raises them; they also derive
from the builtin they replace (``ValueError``, ``RuntimeError``) so existing ``except`` clauses keep working.
"""

from __future__ import annotations


class FmError(Exception):
    """A problem the user can fix; the message says where and how."""

    exit_code = 2  # a usage or input error


class ConfigError(FmError, ValueError):
    """A config file or command-line value is wrong; the message names the file or flag, the key and the fix."""
