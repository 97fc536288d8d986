"""The error every user-facing failure derives from: the CLI prints it without a traceback."""


class MealV2Error(Exception):
    """Bad input or state a user can fix; the message names the file or value and what was expected."""
