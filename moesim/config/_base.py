"""Shared pydantic configuration for the scenario dataclasses.

Every config class is a frozen, keyword-only pydantic dataclass: typed fields, field
paths in error messages, and a JSON schema for editors, without hand-written checks.
Unknown keys are errors, so a typo in a YAML file never passes silently.
"""

from __future__ import annotations

from pydantic import ConfigDict

STRICT = ConfigDict(extra="forbid", validate_default=True)
