"""The one exception type for mistakes in what a user gave us (config, paths, files, strings).

Command-line entry points catch it and print its message as a single line, so a typo in a
config key reads as one sentence naming the key rather than a traceback; genuine bugs keep
their tracebacks because they are any other exception type.
"""


class UserError(ValueError):
    """Bad input from the user; the message names the file or key and what is wrong."""
