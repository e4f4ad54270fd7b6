"""`python -m graft.controller`: run the operator."""

import sys

# kopf imports the synchronous `kubernetes` client for its own login fallbacks when it is
# installed (dev environments). The operator logs in with its own handler and talks to the API
# through kubernetes_asyncio only, so that client would be ~10 MiB of dead weight.
sys.modules.setdefault("kubernetes", None)  # type: ignore[arg-type]

from graft.controller.main import main  # noqa: E402

raise SystemExit(main())
