"""The one error type for user mistakes.

Every bad input (a YAML file, a preset name, a `--set` override, an impossible
scenario) becomes an :class:`InputError` that names where it came from, which field
is wrong and what would be allowed. The CLI prints it on one line and exits with 2.
"""

from __future__ import annotations


class InputError(ValueError):
    """A user mistake: names the source (file), the field and what is allowed."""

    def __init__(
        self,
        problem: str,
        *,
        field: str | None = None,
        allowed: str | None = None,
        source: str | None = None,
    ) -> None:
        # A value or key from the input may be megabytes long: the line stays readable.
        self.problem = _clipped(problem, 500)
        self.field = None if field is None else _clipped(field, 200)
        self.allowed = allowed
        self.source = source
        super().__init__(str(self))

    def with_source(self, source: str) -> InputError:
        """The same error, attributed to ``source`` unless it already names one."""
        if self.source is not None:
            return self
        return InputError(self.problem, field=self.field, allowed=self.allowed, source=source)

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.source, self.field) if part)
        text = f"{where}: {self.problem}" if where else self.problem
        if self.allowed:
            text += f" (allowed: {self.allowed})"
        return text


def _clipped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
