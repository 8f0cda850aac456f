"""`python -m bot.worker`: the worker process (the only process that imports torch)."""

import logging
import os
import sys

from bot.worker.server import main

code = main()
logging.shutdown()
sys.stderr.flush()
# Skip interpreter teardown: with torch loaded it is slow and nothing is left to clean up.
os._exit(code)
