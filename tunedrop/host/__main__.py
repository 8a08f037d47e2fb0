"""``python -m tunedrop.host [--root DIR] [--port 7071]``: serve function_app.py until Ctrl-C."""

import sys

from tunedrop.host.host import main

sys.exit(main())
