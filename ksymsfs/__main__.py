"""``python -m ksymsfs``."""

from .cli import main

main()
