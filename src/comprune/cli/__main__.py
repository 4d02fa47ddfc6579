"""python -m comprune.cli"""
import sys

from . import main

sys.exit(main())
