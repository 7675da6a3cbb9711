"""How a value read from a file (a card, a state) is quoted in an error message: escaped, and
cut short, so that a hostile file can never make a message large or forge a log line."""

from __future__ import annotations


def shown_value(value: object, limit: int = 60) -> str:
    """A short, escaped rendering of `value`, for an error message."""
    try:
        text = ascii(value)
    except ValueError:  # an integer with more digits than Python will print
        text = f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[:limit - 3] + "..."
