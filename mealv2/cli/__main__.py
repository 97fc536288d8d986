"""`python -m mealv2.cli`: the same as the `mealv2` command."""
from . import main

main()
