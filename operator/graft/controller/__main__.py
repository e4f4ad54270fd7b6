"""`python -m graft.controller`: run the operator."""

import sys

# kopf imports the Kubernetes client libraries when they are installed (dev environments), to
# log in with them and to convert their model objects. The operator logs in with its own
# handler and speaks plain dicts over aiohttp (graft.controller.kube), so they would be ~60 MiB
# and ~2 s of start-up of dead weight.
sys.modules.setdefault("kubernetes", None)  # type: ignore[arg-type]
sys.modules.setdefault("kubernetes_asyncio", None)  # type: ignore[arg-type]

from graft.controller.main import main  # noqa: E402

raise SystemExit(main())
