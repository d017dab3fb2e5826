"""qswap's one exception hierarchy.

Every error qswap raises on purpose is a ``QSwapError``; each class also
subclasses the builtin it resembles, so ``except ValueError`` keeps working::

    QSwapError(Exception)
    ├── ConfigError(QSwapError, ValueError)          a config file or dict is invalid
    ├── RegistrationError(QSwapError, ValueError)    a registry entry is refused
    │   └── FrozenRegistryError                      a write to a frozen registry
    ├── NotRegisteredError(QSwapError, LookupError)  a name or class has no entry
    ├── PluginError(QSwapError, ImportError)         an entry-point plugin failed
    ├── UnsupportedModuleError(QSwapError, TypeError) a module cannot be quantized as asked
    ├── PlanError(QSwapError, ValueError)            the config cannot be applied to this model
    ├── CalibrationError(QSwapError, RuntimeError)   observers cannot produce parameters
    └── FileError(QSwapError, OSError)               a path cannot be written or read as asked

    FallbackWarning(UserWarning)                     layers the backend cannot run fall back

Messages say what was wrong, where, and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "ConfigError",
    "FallbackWarning",
    "FileError",
    "FrozenRegistryError",
    "NotRegisteredError",
    "PlanError",
    "PluginError",
    "QSwapError",
    "RegistrationError",
    "UnsupportedModuleError",
]


class QSwapError(Exception):
    """Base class of every error qswap raises on purpose."""


class ConfigError(QSwapError, ValueError):
    """A config is invalid; ``source``, ``line``, ``col`` and ``path`` say where.

    ``line`` and ``col`` are 1-based and ``None`` when the config did not come
    from text (a dict or a ``QConfig``).
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        col: int | None = None,
        path: str | None = None,
    ) -> None:
        self.source = source
        self.line = line
        self.col = col
        self.path = path
        self.reason = message
        where = ""
        if source is not None:
            where = source
            if line is not None:
                where += f":{line}"
                if col is not None:
                    where += f":{col}"
            where += ": "
        field = f"{path}: " if path else ""
        super().__init__(f"{where}{field}{message}")


class RegistrationError(QSwapError, ValueError):
    """A registry entry was refused (duplicate, broken contract, bad pack)."""


class FrozenRegistryError(RegistrationError):
    """A write was attempted on a frozen registry."""


class NotRegisteredError(QSwapError, LookupError):
    """A name or class has no registry entry.

    ``str()`` of a ``KeyError`` quotes its message; this class is a
    ``LookupError`` instead so messages print as written.
    """


class PluginError(QSwapError, ImportError):
    """An entry-point plugin failed to import or to register."""


class UnsupportedModuleError(QSwapError, TypeError):
    """A module cannot be quantized as the config asks."""


class PlanError(QSwapError, ValueError):
    """The config cannot be applied to this model (e.g. a bad fusion group)."""


class CalibrationError(QSwapError, RuntimeError):
    """Observers cannot produce quantization parameters (e.g. no data seen)."""


class FileError(QSwapError, OSError):
    """A path cannot be written or read as asked (a folder where a file goes, a corrupt file).

    The message names the path the caller gave, never a temporary name, and what to do.
    """


class FallbackWarning(UserWarning):
    """Some layers cannot run on the config's backend and fall back (to fake or float).

    Said once per ``prepare`` (and so per ``quantize``), in one line; ``print(plan)`` shows
    each layer with its reason. Filter it like any warning:
    ``warnings.filterwarnings("ignore", category=qswap.FallbackWarning)``.
    """
