"""The one exception type of the package: a problem the user can fix.
"""

from __future__ import annotations


class RecipeError(RuntimeError):
    """A problem the user can fix; the message says what to change."""
