"""bonefrac: bone radiograph fracture classification that is honest about how well it does."""

__version__ = "0.1.0"

# Every user-facing output carries this line: the CLI, reports, the web page.
DISCLAIMER = "bonefrac is a research tool, not a medical device: its output is not a diagnosis."
