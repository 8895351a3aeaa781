"""Errors fleet reports to the operator as one line, with exit code 2 for bad input."""


class UsageError(Exception):
    """Bad input (inventory, role, command line): reported as one line, exit code 2, no host touched."""

    def __init__(self, message, path=None, line=None, key=None):
        self.path, self.line, self.key, self.message = path, line, key, message
        super().__init__(self.one_line())

    def one_line(self):
        where = ""
        if self.path:
            where = f"{self.path}:{self.line}: " if self.line else f"{self.path}: "
        key = f"{self.key}: " if self.key else ""
        return f"{where}{key}{self.message}"
