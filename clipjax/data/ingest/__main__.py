"""``python -m clipjax.data.ingest``: see ``clipjax.data.ingest``."""

import sys

from clipjax.data.ingest import main

sys.exit(main())
