"""`python -m quantsafe` runs the CLI."""

from quantsafe.cli.main import main

main()
