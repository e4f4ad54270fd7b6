"""`python -m graft.controller`: run the operator."""

from graft.controller.main import main

raise SystemExit(main())
