"""Errors a user can act on.

Every failure caused by input names that input, so the CLI can print one line and exit 1 instead of a
traceback. Infeasible requirements are not errors: they are results (see solver.conflict).
"""


class InputError(Exception):
    """Bad input: malformed or hostile XML, unknown OS, unreadable host data, wrong root element.

    The message already names the input (file:line, XPath, OS id) and says what would be accepted.
    """
